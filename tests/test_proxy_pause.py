"""A spawned engine outlives a pause of its live proxy (SIGSTOP, a debugger, a VM pause): with a pidfd on
its proxy, only the proxy's death ends it, never silence alone."""

import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import time

from helpers import ROOT, built_model, kill_session

PAUSE_S = 15.0  # three times rank 0's heartbeat bound (5 s)

PROXY_SCRIPT = textwrap.dedent("""
    import json, sys
    from tpserve import LLM, SamplingParams
    prompts = [[3, 4, 5 + i] for i in range(4)]
    params = SamplingParams(max_tokens=600, temperature=0, ignore_eos=True)
    with LLM(model=sys.argv[1], max_seq_len=1024, max_batch_size=8) as llm:
        streams = [llm.generate_stream(p, params) for p in prompts]
        chunks = [list(next(s).token_ids) for s in streams]
        print(json.dumps({"mpirun": llm.workers.pid}), flush=True)  # every stream is under way
        for s, ids in zip(streams, chunks):
            ids.extend(t for c in s for t in c.token_ids)
        got = [s.output.token_ids for s in streams]
        assert got == chunks
        reasons = [s.output.finish_reason for s in streams]
        errors = [s.output.error for s in streams]
        try:  # what the streams would have had
            again = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        except Exception as e:
            again = repr(e)
        print(json.dumps({"got": got, "reasons": reasons, "errors": errors, "again": again}), flush=True)
""")


def _line(proc: subprocess.Popen, timeout: float) -> dict:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"no answer from the proxy within {timeout} s"
    line = proc.stdout.readline()
    assert line, f"the proxy exited with {proc.poll()}"
    return json.loads(line)


def test_a_paused_proxy_finds_its_streams_complete():
    proxy = subprocess.Popen([sys.executable, "-c", PROXY_SCRIPT, str(built_model("llama"))], cwd=ROOT,
                             env=dict(os.environ), stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _line(proxy, 180)
        proxy.send_signal(signal.SIGSTOP)
        time.sleep(PAUSE_S)
        proxy.send_signal(signal.SIGCONT)
        result = _line(proxy, 120)
        assert proxy.wait(60) == 0
    finally:
        if proxy.poll() is None:
            proxy.send_signal(signal.SIGCONT)
            kill_session(proxy)
    assert result["reasons"] == ["length"] * 4, result["errors"]
    assert result["got"] == result["again"]
    assert all(len(t) == 600 for t in result["got"])
