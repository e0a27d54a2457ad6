"""``tpserve serve``: an engine behind the OpenAI-compatible API, served by uvicorn until SIGTERM or Ctrl-C.

On the signal the server stops accepting (``/health`` and new requests answer 503), the engine is shut
down on a thread, which ends every in-flight stream with a final event (finish_reason "abort"), uvicorn
lets those responses finish, and the process exits 0.
"""

from __future__ import annotations

import argparse
import sys
import threading
from types import FrameType

import uvicorn

from tpserve.errors import WorkerStartupError
from tpserve.proxy.llm import LLM
from tpserve.server.app import OpenAIServer, create_app

GRACE_S = 30.0  # how long in-flight responses get to end after the signal


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="Hugging Face model directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (MPI ranks)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--max-seq-len", type=int, default=None)
    p.add_argument("--stream-interval", type=int, default=1)
    p.add_argument("--no-overlap", dest="enable_overlap", action="store_false")
    p.add_argument("--no-early-first-token", dest="early_first_token", action="store_false")
    p.add_argument("--connect", default=None, help="attach to workers through this connection file")


def make_llm(args: argparse.Namespace) -> LLM:
    return LLM(
        model=args.model, tensor_parallel_size=args.tp, device=args.device, dtype=args.dtype,
        max_batch_size=args.max_batch_size, max_seq_len=args.max_seq_len, stream_interval=args.stream_interval,
        enable_overlap=args.enable_overlap, early_first_token=args.early_first_token, connect=args.connect,
    )


def add_serve_args(p: argparse.ArgumentParser) -> None:
    add_engine_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (loopback unless told otherwise)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None,
                   help="the model's name in the API (default: --model as given, as vLLM names it; "
                        "the default model's name without --model)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


class GracefulServer(uvicorn.Server):
    """uvicorn, but a signal also begins the engine's shutdown, and is not re-raised at the end (uvicorn
    re-raises it so the process dies of it; we want exit status 0)."""

    def __init__(self, config: uvicorn.Config, api: OpenAIServer) -> None:
        super().__init__(config)
        self.api = api
        self.stopper: threading.Thread | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit:
            self.force_exit = True  # a second signal: stop waiting for responses
            return
        self.should_exit = True
        self.api.closing = True
        self.stopper = threading.Thread(target=self.api.llm.shutdown, name="tpserve-engine-shutdown")
        self.stopper.start()


def serve_main(args: argparse.Namespace) -> int:
    try:
        llm = make_llm(args)
    except (WorkerStartupError, ValueError) as e:  # ValueError: an engine option out of range
        print(f"error: the engine did not start: {e}", file=sys.stderr)
        return 1
    try:
        app = create_app(llm, args.served_model_name or (None if args.model is None else args.model.rstrip("/")))
        config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                timeout_graceful_shutdown=int(GRACE_S))
        server = GracefulServer(config, app.state.server)
        try:
            server.run()
        except SystemExit as e:  # uvicorn exits this way when it cannot bind
            return e.code if isinstance(e.code, int) else 1
        if server.stopper is not None:
            server.stopper.join(GRACE_S)
    finally:
        llm.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tpserve serve", description="OpenAI-compatible server over a tpserve engine.")
    add_serve_args(parser)
    return serve_main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
