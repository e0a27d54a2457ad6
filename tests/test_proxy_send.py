"""The proxy's sends when rank 0 does not read (stopped, busy): an abort that cannot go out is retried for
its own stream and never marks the engine dead, and no thread holds the client's lock while a send waits."""

import signal
import threading
import time

import psutil
from helpers import built_model

from tpserve import LLM, EngineDeadError, SamplingParams

FILLER = [1] * 30000  # too long for the engine (an error reply), large enough to fill the pipe quickly


def rank0(llm: LLM) -> psutil.Process:
    for p in psutil.Process(llm.workers.pid).children(recursive=True):
        if "tpserve.worker" in " ".join(p.cmdline()):
            return p
    raise AssertionError("no rank 0")


def test_an_unsendable_abort_ends_its_own_stream_only():
    params = SamplingParams(max_tokens=300, temperature=0, ignore_eos=True)
    with LLM(model=str(built_model("llama")), max_seq_len=400, max_batch_size=8) as llm:
        expected = llm.generate([[3, 4, 5], [3, 4, 6]], params, use_tqdm=False)
        victim, *others = (llm.generate_stream(p, params) for p in ([3, 4, 7], [3, 4, 5], [3, 4, 6]))
        for s in (victim, *others):
            next(s)
        worker = rank0(llm)
        worker.send_signal(signal.SIGSTOP)  # rank 0 reads nothing: the proxy's queue fills
        try:
            full = False
            for _ in range(5000):
                try:
                    llm.generate_stream(FILLER, SamplingParams(max_tokens=1))
                except EngineDeadError:
                    full = True
                    break
            assert full, "the proxy's send queue never filled"

            # A send that waits (this submit, up to its bound) holds no lock others need.
            blocked = threading.Thread(target=lambda: _submit_quietly(llm))
            blocked.start()
            time.sleep(0.2)
            start = time.monotonic()
            llm.stats()  # takes the client's lock (pending streams)
            took = time.monotonic() - start
            blocked.join(30)
            assert took < 0.5, f"stats() waited {took:.2f} s behind a blocked send"

            victim.abort()  # cannot be sent now
            time.sleep(0.3)
            assert llm.client.dead is None
            assert not any(s.finished for s in others)
        finally:
            worker.send_signal(signal.SIGCONT)
        out = victim.result(timeout=120)
        assert out.finish_reason == "abort", (out.finish_reason, out.error)
        for s, want in zip(others, expected, strict=True):
            got = s.result(timeout=120)
            assert got.finish_reason == "length", got.error
            assert got.token_ids == want.token_ids
        assert llm.client.dead is None


def _submit_quietly(llm: LLM) -> None:
    try:
        llm.generate_stream(FILLER, SamplingParams(max_tokens=1))
    except EngineDeadError:
        pass
