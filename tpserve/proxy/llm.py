"""``LLM``: the user's handle on a tensor-parallel engine (spawned with mpirun, or attached to)."""

from __future__ import annotations

import atexit
import dataclasses
import itertools
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Any

import psutil
from tqdm import tqdm

from tpserve import hop_trace, stacks, wire
from tpserve.engine_args import EngineArgs
from tpserve.errors import EngineDeadError, WorkerStartupError
from tpserve.model_path import resolve_model
from tpserve.proxy.client import EngineClient
from tpserve.proxy.launcher import WorkerProcess, mpi_environment
from tpserve.proxy.outputs import RequestOutput
from tpserve.proxy.streams import RequestStream
from tpserve.proxy.tokenizer import IncrementalDetokenizer, Tokenizer
from tpserve.sampling_params import SamplingParams
from tpserve.shutdown_trace import phase_timer, trace

Prompt = str | list[int]
PROXY_SWITCH_INTERVAL_S = 0.0002  # unless the user chose a shorter one
IPC_PATH_MAX = 100  # ipc:// + a Unix socket path (108 bytes on Linux, 104 on macOS, with its NUL)
ATTACH_TIMEOUT_S = 10.0  # the most LLM(connect=...) waits for the engine behind the file to answer


class LLM:
    """An engine of ``tensor_parallel_size`` MPI ranks behind a ZeroMQ proxy.

    ``model=None`` serves the built-in default model (SmolLM2-135M-Instruct); ``connect="FILE"`` attaches
    to workers started by the user with ``--connection-file FILE`` instead of spawning them (the engine
    options are then the workers' own: giving any here raises ``ValueError``). The keyword arguments are
    the fields of ``EngineArgs`` (``tensor_parallel_size=1, device="auto", ..., mpirun_args=()``); a name
    that is none of them raises ``TypeError``, a value out of range ``ValueError``.
    """

    def __init__(self, model: str | None = None, *, connect: str | None = None, startup_timeout: float = 300.0,
                 **engine_options: Any) -> None:
        started = time.perf_counter()
        if sys.getswitchinterval() > PROXY_SWITCH_INTERVAL_S:
            # The dispatch thread hands each output to the user: woken by the socket, it waits for the GIL
            # behind whatever else runs Python here (a server's event loop, the user's threads), up to the
            # switch interval, 5 ms by default. Only contended hand-offs pay for a shorter one.
            sys.setswitchinterval(PROXY_SWITCH_INTERVAL_S)
        engine = EngineArgs.from_kwargs({"model": model, **engine_options}, "LLM()")
        if connect is not None:  # the attached engine runs with the options it was started with
            given = [f.name for f in dataclasses.fields(engine) if getattr(engine, f.name) != f.default]
            if given:
                raise ValueError(f"engine options cannot be given with connect= (the attached engine runs with the "
                                 f"options its workers were started with): {', '.join(given)}")
        if connect is None:  # found here, before anything is launched (an attached engine has its own)
            engine.model = resolve_model(engine.model)
        self.engine_args = engine
        self._closed = False
        self._ids = itertools.count()
        self._shutdown_lock = threading.Lock()
        self._force = threading.Event()
        self.workers: WorkerProcess | None = None
        self._ipc_dir: str | None = None
        trace("proxy", "start", connect=connect or "", tp=engine.tensor_parallel_size)
        stacks.install()  # `tpserve stacks PID` dumps this process too, and finds its engine through the note
        if connect is not None:
            stacks.note(connect=os.path.abspath(connect))
        if connect is not None:
            self.client = EngineClient(wire.ConnectionInfo.read(connect), bind=False, workers=None)
        else:
            key = wire.new_key()
            # Rank 0 runs on this host (the sockets bind the loopback): Unix sockets in a directory only this
            # user can enter. A hop over them costs ~60% of one over TCP loopback (docs/benchmarks.md), and no
            # other local user can even connect (over TCP they could, and only the HMAC kept them out).
            self._ipc_dir = tempfile.mkdtemp(prefix="tpserve-ipc-")
            addrs = (f"ipc://{self._ipc_dir}/requests", f"ipc://{self._ipc_dir}/responses")
            if len(addrs[1]) > IPC_PATH_MAX:  # a long TMPDIR: a Unix socket's path has a small limit
                addrs = ("tcp://127.0.0.1:*", "tcp://127.0.0.1:*")
            self.client = EngineClient(wire.ConnectionInfo(*addrs, key), bind=True, workers=None)
            env = mpi_environment(engine.tensor_parallel_size)
            env[wire.ENV_KEY] = key.hex()  # never argv: other users can read a process's arguments
            env[wire.ENV_REQUEST_ADDR] = self.client.conn.request_addr
            env[wire.ENV_RESPONSE_ADDR] = self.client.conn.response_addr
            env[wire.ENV_OWNER] = f"{os.getpid()}:{psutil.Process().create_time()!r}"
            self.workers = WorkerProcess(engine.tensor_parallel_size, engine.to_cli_args(), env,
                                         list(engine.mpirun_args))
            self.client.workers = self.workers
        # Workers write the connection file only once ready, so a live engine answers at once; a file
        # whose engine is gone must not cost the whole start-up timeout.
        timeout = startup_timeout if connect is None else min(startup_timeout, ATTACH_TIMEOUT_S)
        try:
            self.info = self.client.handshake(timeout)
        except WorkerStartupError as e:
            self._teardown(sentinel=False)
            if connect is None:
                raise
            raise WorkerStartupError(
                f"no engine answered through the connection file {connect} ({self.client.conn.request_addr}) "
                f"within {timeout:g} s: the file is stale (the engine that wrote it is gone: remove the file) "
                "or that engine cannot be reached from here"
            ) from e
        except BaseException:
            self._teardown(sentinel=False)
            raise
        self.client.start_dispatcher()
        for w in self.info.get("warnings") or []:  # the engine's own log is a temporary file: tell the user
            print(f"tpserve: warning: {w}", file=sys.stderr, flush=True)
        self.startup_s = round(time.perf_counter() - started, 3)  # to READY: launch, load, kernels, graphs
        self.tokenizer: Tokenizer | None = None
        tok_dir = self.info.get("model_dir", "")
        if os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
            self.tokenizer = Tokenizer(tok_dir)
        _live.add(self)
        trace("proxy", "ready", **{k: v for k, v in self.info.items() if isinstance(v, (int, str))})

    # -- requests ------------------------------------------------------------------------------------------

    def _prompt_ids(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass token ids")
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)):
            # What cannot even travel is refused here; ids outside the vocabulary end the request with an
            # error in the engine, like every request the engine cannot serve.
            if not all(isinstance(t, int) and not isinstance(t, bool) and -(2**31) <= t < 2**31 for t in prompt):
                raise ValueError("prompt: token ids must be integers in [-2**31, 2**31)")
            return None, list(prompt)
        raise TypeError(f"prompt must be a string or a list of token ids, not {type(prompt).__name__}")

    def _submit(self, prompt: Prompt, params: SamplingParams | None, stream: bool) -> RequestStream:
        if self._closed:
            raise EngineDeadError("this LLM was shut down")
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError("sampling_params must be a SamplingParams")
        text, ids = self._prompt_ids(prompt)
        rid = next(self._ids)
        out = RequestOutput(rid, text, ids)
        out.metrics.arrival_proxy = time.time()
        detok = IncrementalDetokenizer(self.tokenizer) if self.tokenizer is not None else None
        rs = RequestStream(out, detok, self.abort, stream)
        self.client.submit(rs, wire.Submit(rid, ids, params.to_dict(), stream, out.metrics.arrival_proxy))
        if hop_trace.ENABLED:
            hop_trace.stamp(rid, "p_submit", out.metrics.arrival_proxy)
            hop_trace.stamp(rid, "p_sent")
        return rs

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Runs every prompt (a string, token ids, or a list of either); one output per prompt, in order."""
        if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)  # type: ignore[arg-type]
        if isinstance(sampling_params, Sequence):
            if len(sampling_params) != len(prompts):
                raise ValueError("sampling_params: one per prompt, or a single one for all")
            params_list = list(sampling_params)
        else:
            params_list = [sampling_params] * len(prompts)
        streams: list[RequestStream] = []
        try:
            for p, sp in zip(prompts, params_list, strict=True):
                streams.append(self._submit(p, sp, stream=False))
            with tqdm(total=len(streams), disable=not use_tqdm or len(streams) < 8, desc="generate") as bar:
                outputs = []
                for s in streams:
                    outputs.append(s.result())
                    bar.update(1)
            return outputs
        except BaseException:  # Ctrl-C (or any error) here: the engine must not keep computing for nobody
            for s in streams:
                s.abort()
            raise

    def generate_stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None) -> RequestStream:
        """A sync iterator of ``StreamChunk`` deltas; ``.abort()`` ends it early, ``.result()`` waits."""
        return self._submit(prompt, sampling_params, stream=True)

    def generate_async(
        self, prompt: Prompt, sampling_params: SamplingParams | None = None, streaming: bool = True
    ) -> RequestStream:
        """``async for chunk in llm.generate_async(...)`` or ``out = await llm.generate_async(..., streaming=False)``."""
        return self._submit(prompt, sampling_params, stream=streaming)

    def stats(self) -> dict:
        """The engine's load as rank 0 last reported it (with READY, then with its outputs): running, waiting,
        iteration_time_s, kv_cache_usage, prefix_cache_hit_rate, num_preemptions, num_free_blocks,
        shutting_down, triton_compiles; plus ``pending`` requests on this side and ``dead``. Every key is
        there from the start."""
        stats = {"running": 0, "waiting": 0, "iteration_time_s": 0.0, "kv_cache_usage": 0.0,
                 "prefix_cache_hit_rate": 0.0, "num_preemptions": 0,
                 "num_free_blocks": max(0, int(self.info.get("num_kv_blocks", 1)) - 1), "shutting_down": False,
                 "triton_compiles": 0, **(self.info.get("stats") or {}), **self.client.stats}
        stats["shutting_down"] = bool(stats.get("shutting_down")) or self._closed
        stats["pending"] = len(self.client.pending())
        stats["dead"] = self.client.dead
        return stats

    def abort(self, request_id: int) -> None:
        """Asks the engine to end the request; one that cannot be sent now is retried (see
        ``EngineClient.abort``) and concerns that request alone."""
        self.client.abort(request_id)

    # -- shutdown ------------------------------------------------------------------------------------------

    def shutdown(self, drain: bool = False, timeout: float = 30.0) -> None:
        """Ends the engine: aborts pending requests (or lets them finish within ``timeout`` when ``drain``),
        sends the sentinel, waits for the workers (bounded), stops the dispatcher, closes sockets, reaps
        mpirun. Idempotent; also runs at interpreter exit. A Ctrl-C while it runs forces: SIGKILL."""
        with self._shutdown_lock:
            if self._closed:
                return
            self._closed = True
        restore = self._arm_force_on_sigint()
        try:
            with phase_timer("proxy", "shutdown", drain=drain, pending=len(self.client.pending())):
                if drain:
                    deadline = time.monotonic() + timeout
                    for s in self.client.pending():
                        left = deadline - time.monotonic()
                        if left <= 0 or self._force.is_set():
                            break
                        try:
                            s.result(left)
                        except TimeoutError:
                            break
                    trace("proxy", "drain_wait_done", pending=len(self.client.pending()))
                self._teardown(sentinel=True)
        finally:
            restore()
            _live.discard(self)

    def _arm_force_on_sigint(self):
        """In the main thread, a Ctrl-C during shutdown kills the workers at once instead of raising."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None

        def force(signum: int, frame: object) -> None:
            trace("proxy", "forced", signum=signum)
            self._force.set()
            if self.workers is not None:
                self.workers.kill_group(signal.SIGKILL)

        try:
            previous = signal.signal(signal.SIGINT, force)
        except ValueError:  # not the main interpreter
            return lambda: None
        return lambda: signal.signal(signal.SIGINT, previous)

    def _wait(self, done, timeout: float) -> bool:
        """Waits for ``done()`` up to ``timeout``, or until a forced shutdown."""
        deadline = time.monotonic() + timeout
        while not done():
            if self._force.is_set() or time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def _teardown(self, sentinel: bool) -> None:
        alive = self.client.dead is None and (self.workers is None or self.workers.poll() is None)
        if sentinel and alive:
            sent = any(self.client.send(wire.Shutdown(drain=False)) for _ in range(3))
            trace("proxy", "sentinel", outcome="SENT" if sent else "FAILED")
            got = self._wait(self.client.goodbye.is_set, 10.0)
            trace("proxy", "wait_goodbye", outcome="ok" if got else "timeout")
        else:
            why = "startup failed" if not sentinel else f"workers not alive: {(self.client.dead or '').splitlines()[:1]}"
            trace("proxy", "sentinel", outcome="SKIPPED", why=why)
        for s in self.client.pending():
            s.fail("abort", "the engine was shut down")
        trace("proxy", "pending_aborted")
        if self.workers is not None:
            exited = self._wait(lambda: self.workers.poll() is not None, 10.0)
            trace("proxy", "wait_workers", outcome="exited" if exited else "timeout", code=self.workers.poll())
        self.client.close()
        if self._ipc_dir is not None:  # the socket files go with the sockets
            shutil.rmtree(self._ipc_dir, ignore_errors=True)
        if self.workers is not None:
            code = self.workers.stop()
            trace("proxy", "mpirun_reaped", code=code)
            shutil.rmtree(self.workers.log_dir, ignore_errors=True)
        trace("proxy", "exit")

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()



_live: set[LLM] = set()  # shut down at exit, so no worker outlives a user who forgot to


@atexit.register
def _shutdown_all() -> None:
    for llm in list(_live):
        llm.shutdown()
