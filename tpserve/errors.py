"""Errors the public API raises."""


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
