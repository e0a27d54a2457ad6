"""Structured output on the engine's side: grammars compiled off the loop thread, one matcher per constrained
request, and the token masks applied to the logits just before sampling.

The backend is llguidance (docs/benchmarks.md has the measurement against xgrammar: 5x faster compiles, the
same mask time, a 3 MB wheel without dependencies). Every rank keeps its own matchers, advanced by the same
tokens, so every rank builds the same masks without a collective per step; the one thing the ranks must
agree on is *when* a request's grammar is ready (compile times differ per rank), which one small allreduce
decides, made only in iterations where some grammar is still compiling.

Order within the loop (docs/design.md): a matcher consumes a request's token when the token reaches the host
(``advance``, from the executor's update of step k-1), and the masks for step k are built after that update,
right before step k's sampling is launched (``mask_logits``); in the overlap loop both happen while the
device runs forward k."""

from __future__ import annotations

import concurrent.futures as cf
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tpserve.structured_outputs import StructuredOutputs, llguidance_grammar

if TYPE_CHECKING:
    from mpi4py import MPI

    from tpserve.executor.request import Request

COMPILE_TIMEOUT_S = 30.0  # a grammar not compiled by then ends its request (llguidance's own limits come first)
CACHE_SIZE = 256  # compiled grammars kept (least recently used dropped)
IDLE_WAIT_S = 0.002  # with nothing else to run, the loop waits this long for a compile before iterating again
PAR_MIN_ROWS = 8  # masks of at least this many rows are filled by llguidance's thread pool
COMPILE_THREADS = 2  # so one slow grammar does not hold up the others

COMPILING, READY, FAILED = 0, 1, 2


class Backend:
    """llguidance over the model's tokenizer: the vocabulary goes in once (``tokenizer``, built on a compile
    thread by the engine's first compile), then each constraint becomes a matcher."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: list[int]) -> None:
        self.tokenizer_json = tokenizer_json
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self._tokenizer: Any = None
        self._lock = threading.Lock()

    def tokenizer(self) -> Any:
        with self._lock:  # two compile threads: one build
            return self._build_tokenizer()

    def _build_tokenizer(self) -> Any:
        if self._tokenizer is None:
            import llguidance
            from tokenizers import Tokenizer

            text = Tokenizer.from_file(self.tokenizer_json).to_str()
            self._tokenizer = llguidance.LLTokenizer(text, n_vocab=self.vocab_size,
                                                     eos_token=self.eos_token_ids or None)
        return self._tokenizer

    def compile(self, so: StructuredOutputs) -> Any:
        """A matcher at the grammar's start, its first mask computed (llguidance builds the lexer lazily), to
        be copied for every request with this constraint. Raises ``ValueError`` with the backend's reason."""
        from llguidance import LLMatcher

        try:
            grammar = llguidance_grammar(so)
        except Exception as e:  # noqa: BLE001 - the backend's reason, for that request alone
            raise ValueError(str(e)) from None
        matcher = LLMatcher(self.tokenizer(), grammar, log_level=0)
        if not matcher.is_error():
            words = np.zeros(_words(self.vocab_size), dtype=np.int32)
            matcher.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)
        if matcher.is_error():
            raise ValueError(matcher.get_error().strip())
        return matcher


def backend_for(model_dir: str, vocab_size: int, eos_token_ids: list[int]) -> tuple[Backend | None, str]:
    """The model's backend, or None and why structured output cannot be served (told to each such request)."""
    try:
        import llguidance  # noqa: F401
    except ImportError as e:
        return None, f"structured output needs the llguidance package ({e})"
    path = os.path.join(model_dir, "tokenizer.json")
    if not os.path.isfile(path):
        return None, "structured output needs the model's tokenizer.json, and this model has none"
    return Backend(path, vocab_size, eos_token_ids), ""


@dataclass(eq=False)
class _Pending:
    request: Request
    future: cf.Future
    since: float


@dataclass(eq=False)
class _Matcher:
    template: Any  # the cached matcher at the grammar's start
    matcher: Any
    consumed: int = 0  # output tokens the matcher has taken


class GrammarManager:
    """The engine's structured-output state on one rank: the compile threads and their cache, the requests
    whose grammar is not ready on every rank yet, and each admitted request's matcher.

    ``pending`` changes only at points every rank reaches in the same iteration (``add``, ``poll``,
    ``remove``), so ``poll``'s collective is made by all ranks or by none."""

    def __init__(self, backend: Backend | None, comm: MPI.Comm | None = None, device: torch.device | None = None,
                 unavailable: str = "structured output is not available on this engine") -> None:
        self.backend = backend
        self.unavailable = unavailable
        self.comm = comm if comm is not None and comm.Get_size() > 1 else None
        self.device = device if device is not None else torch.device("cpu")
        self.pool: cf.ThreadPoolExecutor | None = None
        self.cache: OrderedDict[tuple[str, str, bool], cf.Future] = OrderedDict()
        self.pending: list[_Pending] = []
        self.matchers: dict[Request, _Matcher] = {}
        self._buffers: list[torch.Tensor] = []  # two host buffers for masks, used in turn
        self._turn = 0
        self._par: Any = None  # llguidance's thread pool for large batches of masks
        self.num_compiled = 0
        self.num_cache_hits = 0

    def start(self) -> None:
        """Starts the compile threads. The tokenizer's vocabulary goes to llguidance with the first compile,
        not at start-up: building it holds the GIL for 0.3 s (1 s on a loaded CPU), which in a background
        thread froze the loop, the intake and the signal handlers right after READY (a SIGTERM then went
        unhandled), and as a start-up stage would add that to every launch."""
        if self.backend is not None and self.pool is None:
            self.pool = cf.ThreadPoolExecutor(COMPILE_THREADS, thread_name_prefix="tpserve-grammar")

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = None

    # -- compiling, and when a request's grammar is ready on every rank ---------------------------------

    def add(self, req: Request) -> None:
        """Starts (or finds in the cache) the compile of a new request's grammar; the request waits in
        ``pending`` and reaches the scheduler through ``poll``."""
        so = req.params.structured
        assert so is not None
        future = self.cache.get(so.key)
        if future is not None:
            self.cache.move_to_end(so.key)
            self.num_cache_hits += 1
        else:
            future = cf.Future()
            if self.backend is None:
                future.set_exception(ValueError(self.unavailable))
            else:
                self.start()
                assert self.pool is not None
                future = self.pool.submit(self.backend.compile, so)
                self.num_compiled += 1
            self.cache[so.key] = future
            while len(self.cache) > CACHE_SIZE:
                self.cache.popitem(last=False)
        self.pending.append(_Pending(req, future, time.monotonic()))

    def poll(self, wait: bool = False) -> tuple[list[Request], list[tuple[Request, str]]]:
        """(requests whose grammar is ready on every rank, requests whose grammar failed on some rank, with
        why), in arrival order. Collective over the ranks when anything is pending. ``wait``: nothing else to
        run, so wait a little for the oldest compile instead of spinning."""
        if not self.pending:
            return [], []
        if wait:
            cf.wait([self.pending[0].future], timeout=IDLE_WAIT_S)
        now = time.monotonic()
        local = [self._state(p, now) for p in self.pending]
        low, high = local, local
        if self.comm is not None:
            from mpi4py import MPI

            both = np.array(local + [-s for s in local], dtype=np.int32)  # min of -s is -(max of s)
            self.comm.Allreduce(MPI.IN_PLACE, both, op=MPI.MIN)
            n = len(local)
            low, high = both[:n].tolist(), (-both[n:]).tolist()
        ready: list[Request] = []
        failed: list[tuple[Request, str]] = []
        still: list[_Pending] = []
        for p, lo, hi in zip(self.pending, low, high, strict=True):
            if lo == COMPILING:
                still.append(p)
            elif hi == FAILED:
                failed.append((p.request, self._why(p, now)))
            else:
                template = p.future.result()
                self.matchers[p.request] = _Matcher(template, template.deep_copy())
                ready.append(p.request)
        self.pending = still
        return ready, failed

    @staticmethod
    def _state(p: _Pending, now: float) -> int:
        if p.future.done():
            return FAILED if p.future.exception() is not None else READY
        return FAILED if now - p.since > COMPILE_TIMEOUT_S else COMPILING

    @staticmethod
    def _why(p: _Pending, now: float) -> str:
        if not p.future.done():
            return f"structured output: the grammar did not compile within {COMPILE_TIMEOUT_S:g} s"
        e = p.future.exception()
        if e is None:
            return "structured output: the grammar failed to compile on another rank"
        return f"structured output: invalid {p.request.params.structured.kind}: {e}"

    def remove(self, req: Request) -> None:
        """Forgets an ended (or aborted) request, compiling or not."""
        self.matchers.pop(req, None)
        self.pending = [p for p in self.pending if p.request is not req]

    # -- matchers ---------------------------------------------------------------------------------------

    def advance(self, req: Request) -> tuple[bool, str | None]:
        """Brings the request's matcher up to its output tokens (normally the one just appended): (whether the
        grammar is complete and takes nothing more, an error when a token broke it)."""
        st = self.matchers.get(req)
        if st is None:
            return False, None
        m = self._synced(req, st)
        if m.is_error():
            return False, f"structured output: {m.get_error().strip()}"
        return m.is_stopped(), None

    @staticmethod
    def _synced(req: Request, st: _Matcher) -> Any:
        """The matcher with exactly the request's output tokens consumed. Usually it consumes the new ones; a
        request whose tokens no longer extend what the matcher took is rebuilt from the grammar's start."""
        tokens = req.output_token_ids
        if st.consumed > len(tokens):
            st.matcher = st.template.deep_copy()
            st.consumed = 0
        if st.consumed < len(tokens):
            st.matcher.consume_tokens(tokens[st.consumed :])
            st.consumed = len(tokens)
        return st.matcher

    def mask_logits(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """``logits`` (one row per request, in order) with every token a constrained row's grammar forbids at
        -inf: the rows' bitmasks are filled on the host, copied with one (pinned, non-blocking) copy and
        applied on the device by ``apply_token_bitmask``. Unconstrained rows, and rows whose request already
        ended (an overlap step scheduled before its end was known), are left alone. Out of place: the raw
        logits stay for log-probabilities. Returns ``logits`` itself when no row is constrained."""
        rows = [i for i, r in enumerate(requests) if not r.finished and r in self.matchers]
        if not rows:
            return logits
        matchers = [self._synced(requests[i], self.matchers[requests[i]]) for i in rows]
        words = _words(logits.shape[1])
        host = self._buffer(len(rows), words)
        if len(rows) >= PAR_MIN_ROWS:
            self._parallel().unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)], host.data_ptr(),
                                                     words * 4, len(rows))
        else:
            for i, m in enumerate(matchers):
                m.unsafe_compute_mask_ptr(host[i].data_ptr(), words * 4)
        pin = self.device.type == "cuda"
        mask = host.to(logits.device, non_blocking=pin) if pin else host  # a CPU step unpacks it in place
        index = None
        if len(rows) < len(requests):
            index = torch.tensor(rows, dtype=torch.long, pin_memory=pin).to(logits.device, non_blocking=pin)
        return apply_token_bitmask(logits, mask, index)

    def _buffer(self, rows: int, words: int) -> torch.Tensor:
        """A host buffer for this step's masks. Two in turn: the device may still be copying the previous
        step's when this one is filled (the overlap loop)."""
        if not self._buffers or self._buffers[0].shape[0] < rows or self._buffers[0].shape[1] != words:
            pin = self.device.type == "cuda"
            size = max(rows, 2 * self._buffers[0].shape[0] if self._buffers else 8)
            self._buffers = [torch.zeros((size, words), dtype=torch.int32, pin_memory=pin) for _ in range(2)]
        self._turn ^= 1
        return self._buffers[self._turn][:rows]

    def _parallel(self) -> Any:
        if self._par is None:
            import llguidance

            self._par = llguidance.LLExecutor(max(1, min(8, (os.cpu_count() or 2) // 2)))
        return self._par


def _words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


_SHIFTS: dict[torch.device, torch.Tensor] = {}


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """A copy of ``logits`` [N, V] with -inf wherever bit ``t`` of ``bitmask[j]`` (int32 [R, ceil(V/32)], bit
    ``t % 32`` of word ``t // 32``) is 0, in row ``rows[j]`` (every row in order when ``rows`` is None); other
    rows unchanged. A few batched ops whatever
    R is; tokens past the mask's width are forbidden. A host bitmask is unpacked by numpy (one pass, 20x
    faster than torch's shifts on a CPU), a device one by shifts on the device."""
    vocab = logits.shape[1]
    if bitmask.device.type == "cpu":
        bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, count=vocab, bitorder="little")
        allowed = torch.from_numpy(bits).view(torch.bool).to(logits.device)
    else:
        allowed = allowed_by_shifts(bitmask, vocab)
    forbidden = torch.tensor(float("-inf"), dtype=logits.dtype, device=logits.device)
    if rows is None:
        return torch.where(allowed, logits, forbidden)  # every row constrained: one pass
    return logits.index_copy(0, rows, torch.where(allowed, logits.index_select(0, rows), forbidden))


def allowed_by_shifts(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """bool [R, vocab] from an int32 bitmask, by shifts on the bitmask's device (no host round trip)."""
    shifts = _SHIFTS.get(bitmask.device)
    if shifts is None:
        shifts = _SHIFTS[bitmask.device] = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).view(bitmask.shape[0], -1).bool()
    if allowed.shape[1] < vocab:
        allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[1]), value=False)
    return allowed[:, :vocab]
