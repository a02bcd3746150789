"""The hivemind peer a coordinator or worker starts: a clear error when it cannot listen or reach the swarm."""

from __future__ import annotations

import socket

import pytest

from protocol.swarm import Swarm, SwarmError, multiaddr

UNREACHABLE_PEER = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWNceGCu4EH1gbKe9J5vXjh7JYhFTD8pb8Kd5ELPw4iZpU"


def test_a_peer_that_reaches_no_initial_peer_says_which_address_it_tried() -> None:
    with pytest.raises(SwarmError, match="did not answer \\(tried /ip4/127.0.0.1/tcp/9/p2p/"):
        Swarm("127.0.0.1", initial_peers=[UNREACHABLE_PEER])


def test_a_busy_port_is_refused_even_by_another_hivemind_peer_and_an_announced_port_is_fixed() -> None:
    first = Swarm("127.0.0.1", announce="127.0.0.1")  # announcing needs a fixed port: one is chosen
    try:
        [address] = first.visible_addresses()
        port = int(address.split("/")[4])
        assert address.startswith(f"/ip4/127.0.0.1/tcp/{port}/p2p/") and port != 0
        with pytest.raises(SwarmError, match=f"cannot listen on 127.0.0.1:{port}"):
            Swarm("127.0.0.1", port=port)  # p2pd alone would share the port (SO_REUSEPORT)
    finally:
        first.close()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        with pytest.raises(SwarmError, match="another process uses the port"):
            Swarm("127.0.0.1", port=taken.getsockname()[1])
    assert multiaddr("::1", 5) == "/ip6/::1/tcp/5" and multiaddr("coordinator.example", 5) == "/dns/coordinator.example/tcp/5"
