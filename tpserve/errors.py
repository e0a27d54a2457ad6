"""Errors the public API raises, and how a rank's error that only echoes a lost peer is told apart."""

import re

# A rank's error that is only the echo of another rank's death (its collective broke): the proxy looks past it for
# the rank that died, and a rank that fails with it first gives mpirun a moment to notice that death.
PEER_LOSS = re.compile(r"gloo|nccl|connection (reset|closed)|by peer", re.IGNORECASE)


class WorkerStartupError(RuntimeError):
    """A worker failed to start; the message carries the rank's exception, ``worker_traceback`` its trace."""

    def __init__(self, message: str, worker_traceback: str = "") -> None:
        super().__init__(message if not worker_traceback else f"{message}\n--- worker traceback ---\n{worker_traceback}")
        self.worker_traceback = worker_traceback


class EngineDeadError(RuntimeError):
    """The workers are gone (a rank died or the executor failed); no request can be served any more."""


class EngineBusyError(RuntimeError):
    """``LLM(connect=...)`` found the engine serving another client: one client at a time."""


class ModelNotFoundError(ValueError):
    """The model is neither a local directory nor a Hugging Face hub model that could be found; raised by
    ``LLM(...)`` before any worker is launched."""
