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


def test_a_huge_frame_from_a_client_without_a_session_does_not_stall_the_live_one(tmp_path):
    """A signed 16 MiB frame of empty lists from a client that never opened a session is dropped on its
    envelope, undecoded: rank 0's intake and its heartbeats go on, and the live client's stream ends as it
    would have. A too-long prompt of the live client is refused on its own, with an error for its id."""
    engine = Engine(tmp_path)  # rank 0 judges a client silent after 2 s
    try:
        conn = engine.connection()
        with attach_when_free(engine.conn_path, 60) as llm:
            params = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
            expected = llm.generate([[1, 2, 3]], params, use_tqdm=False)[0].token_ids
            stream = llm.generate_stream([1, 2, 3], params)
            next(stream)
            stranger = WireClient(conn)  # never says Hello
            try:
                body = submit(1) | {"prompt_token_ids": [[]] * 16_000_000}
                stranger.raw(stranger.frames("submit", body, 1), "huge, no session")
                too_long = llm.generate([[1] * 200_000], SamplingParams(max_tokens=1), use_tqdm=False)[0]
                assert too_long.finish_reason == "error" and "token ids" in too_long.error, too_long.error
                out = stream.result(timeout=120)
            finally:
                stranger.close()
            assert out.finish_reason == "length" and out.token_ids == expected, (out.finish_reason, out.error)
            assert llm.client.dead is None
        assert engine.popen.wait(30) == 0, engine.log()[-4000:]
        assert "proxy_lost" not in engine.trace()
    finally:
        if engine.popen.poll() is None:
            engine.kill()
