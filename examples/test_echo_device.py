"""The tutorial device's own test: what a device author writes, using the
fixtures vhostuser installs as a pytest plugin (a mock front-end that plays
QEMU's part, connected to the device served in this process)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from vhostuser.testing import FrontendOptions

sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/ is not a package
from echo_device import EchoBackend  # noqa: E402


@pytest.fixture
def vhost_backend():
    return EchoBackend()


@pytest.mark.parametrize("vhost_frontend_options", [FrontendOptions(), FrontendOptions(packed=True)],
                         ids=["split", "packed"])
def test_echo_returns_what_it_reads(vhost_frontend):
    used = vhost_frontend.request(0, [b"hello, ", b"device"], [64])
    assert used.data[: used.length] == b"hello, device"


def test_echo_truncates_to_the_writable_space(vhost_frontend):
    used = vhost_frontend.request(0, [b"0123456789"], [4])
    assert (used.length, used.data[:4]) == (4, b"0123")


def test_many_requests_in_one_batch(vhost_frontend):
    requests = [([f"request {i}".encode()], [32]) for i in range(100)]
    results = vhost_frontend.transfer(0, requests)
    assert [u.data[: u.length] for u in results] == [f"request {i}".encode() for i in range(100)]
