"""The OpenAI-compatible HTTP server: ``create_app`` here, ``tpserve serve`` in ``tpserve.server.run``."""

from tpserve.server.app import create_app

__all__ = ["create_app"]
