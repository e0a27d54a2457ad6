"""``tpserve serve``: an engine behind the OpenAI-compatible API, served by uvicorn until SIGTERM or Ctrl-C.

On the signal the server stops accepting (``/health`` and new requests answer 503), the engine is shut
down on a thread, which ends every in-flight stream with a final event (finish_reason "abort"), uvicorn
lets those responses finish, and the process exits 0.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from types import FrameType

import uvicorn

from tpserve.errors import WorkerStartupError
from tpserve.llm_args import add_engine_args, make_llm
from tpserve.server.app import create_app
from tpserve.server.auth import ENV_VAR, keys_from
from tpserve.server.serving import OpenAIServer

GRACE_S = 30.0  # how long in-flight responses get to end after the signal


def add_serve_args(p: argparse.ArgumentParser) -> None:
    add_engine_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (loopback unless told otherwise)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None,
                   help="the model's name in the API (default: --model as given, as vLLM names it; "
                        "the default model's name without --model)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--api-key", action="extend", nargs="+", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on every /v1/* route (several keys: --api-key A B, or "
                        "repeat the flag; "
                        f"default: the comma-separated keys of ${ENV_VAR}, which keeps them out of the process list)")
    p.add_argument("--api-key-all-routes", action="store_true",
                   help="also require the key on /health and /metrics (open by default, as in vLLM)")
    p.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds a request's body may take to arrive; a slower one gets 408 (default: 30)")


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
    api_keys = keys_from(args.api_key)
    if args.api_key is not None and not api_keys:  # "--api-key $UNSET" must not serve without a key
        print("error: --api-key is empty", file=sys.stderr)
        return 2
    if args.api_key_all_routes and not api_keys:
        print(f"error: --api-key-all-routes needs --api-key or ${ENV_VAR}", file=sys.stderr)
        return 2
    os.environ.pop(ENV_VAR, None)  # read: the workers (and whatever they start) never inherit the keys
    try:
        llm = make_llm(args)
    except (WorkerStartupError, ValueError) as e:  # ValueError: an engine option out of range
        print(f"error: the engine did not start: {e}", file=sys.stderr)
        return 1
    stages = ", ".join(f"{k} {v:g}" for k, v in llm.info.get("startup_stages_s", {}).items() if v >= 0.1)
    print(f"tpserve: engine ready in {llm.startup_s:g} s ({stages or 'no stage over 0.1 s'})", file=sys.stderr,
          flush=True)
    info = llm.info
    print(f"tpserve: max_batch_size {info.get('max_batch_size')}, max_num_tokens {info.get('max_num_tokens')}, "
          f"KV pool {info.get('kv_cache_tokens')} tokens, on {info.get('device')} {info.get('dtype')}",
          file=sys.stderr, flush=True)
    if api_keys:  # how many, never which
        where = "every route" if args.api_key_all_routes else "/v1/* (/health and /metrics open)"
        print(f"tpserve: {len(api_keys)} API key(s) required on {where}", file=sys.stderr, flush=True)
    try:
        app = create_app(llm, args.served_model_name or (None if args.model is None else args.model.rstrip("/")),
                         api_keys, args.api_key_all_routes, body_timeout=args.body_timeout)
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
