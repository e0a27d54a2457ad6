"""The torch.distributed rendezvous address rank 0 offers when the ranks span hosts (attach mode with a
hostfile): never the loopback that a hostname's own /etc/hosts entry often resolves to."""

import socket

import psutil
import pytest

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
