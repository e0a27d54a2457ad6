"""Attach mode, one client after another: a session's requests are its own. A duplicate request id is
refused alone (the original runs on, tracked); when a client falls silent every request it submitted is
aborted; and an output reaches only the session that submitted its request."""

from __future__ import annotations

import os
import time

from helpers import built_model, hf_greedy
from test_wire_fuzz import GREEDY, Engine, WireClient, attach_when_free, submit

from tpserve import SamplingParams, wire

N = 48


def test_a_silent_clients_requests_never_reach_the_next_client(tmp_path):
    engine = Engine(tmp_path)
    try:
        raw = WireClient(engine.connection())
        try:
            raw.send("hello", {"proxy_pid": os.getpid()}, "hello")
            raw.wait(lambda: any(isinstance(m, wire.Ready) for m in raw.other))
            long = GREEDY | {"max_tokens": 2000, "ignore_eos": True}
            for rid in range(N):
                for _ in range(2):  # each id twice: the second is refused, the first runs on
                    raw.send("submit", submit(rid, params=long, stream=True), "submit")
            raw.wait(lambda: all(raw.finished(rid) for rid in range(N)), timeout=60)  # the refusals
            for rid in range(N):
                assert "duplicate request id" in (raw.finished(rid)["error"] or ""), raw.finished(rid)
            raw.wait(lambda: any(d["token_ids"] for d in raw.deltas[0]), timeout=60)
        finally:
            raw.close()  # falls silent with every original running or waiting
        engine.assert_alive()

        prompts = [[1, 2, 3 + i] for i in range(N)]
        with attach_when_free(engine.conn_path, 120) as llm:
            outs = llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0), use_tqdm=False)
            for o in outs:
                assert o.finish_reason == "length" and o.error is None, (o.request_id, o.finish_reason, o.error)
            model = built_model("llama")
            assert [o.token_ids for o in outs] == [hf_greedy(model, p, 8) for p in prompts]
            time.sleep(1.0)  # any late output of the last client's requests would arrive now
            assert llm.client.unrouted == 0, f"{llm.client.unrouted} outputs of requests this client never sent"
        assert engine.popen.wait(30) == 0, engine.log()[-4000:]
        assert f"session_closed\taborted={N}" in engine.trace()
    finally:
        if engine.popen.poll() is None:
            engine.kill()
