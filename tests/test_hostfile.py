"""The multi-host launch of attach mode (``mpirun --hostfile``): the workers started from a hostfile that
names this host, attached through the connection file; and the torch.distributed rendezvous address
rank 0 offers when the ranks span hosts (never the loopback that a hostname's own /etc/hosts entry often
resolves to)."""

import socket

import psutil
import pytest
from helpers import built_model
from test_attach import Workers

from tpserve import LLM, SamplingParams, wire
from tpserve.executor.dist import rendezvous_host


def _outward_ipv4() -> str | None:
    """A non-loopback IPv4 address of this machine, standing in for another host on its network."""
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                return a.address
    return None


def test_one_host_uses_loopback(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "10.9.9.9")  # not needed when no other host must reach rank 0
    assert rendezvous_host(["a", "a", "a"]) == "127.0.0.1"


def test_master_addr_wins_across_hosts(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "10.9.9.9")
    assert rendezvous_host(["a", "b"]) == "10.9.9.9"


def test_route_to_another_host_gives_an_address_it_can_reach(monkeypatch):
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    other = _outward_ipv4()
    if other is None:
        pytest.skip("no non-loopback IPv4 interface")
    # rank 0's own hostname may resolve to loopback: the route to the other host decides instead
    assert rendezvous_host([socket.gethostname(), other]) == other


def test_unresolvable_other_host_falls_back_to_the_hostname(monkeypatch):
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    me = socket.gethostname()
    assert rendezvous_host([me, "no-such-host.invalid"]) == socket.gethostbyname(me)


@pytest.fixture
def workers():
    started: list[Workers] = []
    yield lambda *a, **kw: started.append(Workers(*a, **kw)) or started[-1]
    for w in started:
        w.kill()  # the whole mpirun session, on a failure or a timeout


def test_hostfile_launch_attaches_and_matches_tp1(tmp_path, workers):
    hostfile = tmp_path / "hosts"
    hostfile.write_text(f"{socket.gethostname()} slots=2\n")
    bind = _outward_ipv4() or "127.0.0.1"  # an interface another host could reach, where there is one
    conn = tmp_path / "engine.json"
    launched = workers(tmp_path, conn, 2, "hostfile", mpirun_args=("--hostfile", str(hostfile)),
                       worker_args=("--bind-host", bind))
    prompt, params = [11, 22, 33, 44], SamplingParams(max_tokens=8, temperature=0)
    with LLM(model=str(built_model("qwen3")), max_seq_len=64) as llm:  # TP 1, while the TP 2 ranks start
        tp1 = llm.generate([prompt], params)[0].token_ids
    launched.wait_for(conn)
    info = wire.ConnectionInfo.read(str(conn))
    assert info.request_addr.startswith(f"tcp://{bind}:") and info.response_addr.startswith(f"tcp://{bind}:")
    with LLM(connect=str(conn)) as llm:
        assert llm.info["tensor_parallel_size"] == 2
        assert llm.generate([prompt], params)[0].token_ids == tp1
    assert launched.wait(30) == 0, launched.log()
    assert not conn.exists()
