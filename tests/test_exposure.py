"""Which addresses count as loopback for listening sockets (SPEC section 9)."""

from __future__ import annotations

import pytest

from engine.exposure import is_loopback_endpoint, is_loopback_host


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("", False),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.10", False),
        ("*", False),
        ("no-such-host.invalid", False),
    ],
)
def test_hosts(host, loopback):
    assert is_loopback_host(host) is loopback



@pytest.mark.parametrize(
    ("endpoint", "loopback"),
    [
        ("tcp://127.0.0.1:5560", True),
        ("tcp://127.5.0.1:5560", True),
        ("tcp://localhost:5560", True),
        ("tcp://[::1]:5560", True),
        ("ipc:///tmp/kairos.sock", True),
        ("inproc://x", True),
        ("tcp://*:5560", False),
        ("tcp://0.0.0.0:5560", False),
        ("tcp://[::]:5560", False),
        ("tcp://10.1.2.3:5560", False),
        ("tcp://eth0:5560", False),
    ],
)
def test_zmq_endpoints(endpoint, loopback):
    assert is_loopback_endpoint(endpoint) is loopback


@pytest.mark.parametrize(
    ("endpoint", "loopback"),
    [
        ("tcp://127.0.0.1:5555", True),
        ("tcp://localhost:5555", True),
        ("tcp://[::1]:5555", True),
        ("ipc:///tmp/x", True),
        ("inproc://x", True),
        ("tcp://*:5555", False),
        ("tcp://0.0.0.0:5555", False),
        ("tcp://10.1.2.3:5555", False),
        ("tcp://eth0:5555", False),
        ("pgm://239.192.1.1:5555", False),
    ],
)
def test_more_zmq_endpoints(endpoint, loopback):
    assert is_loopback_endpoint(endpoint) is loopback

