"""EventNotifier / EventConsumer, for every notifier kind (eventfd and pipe)."""
from __future__ import annotations

import fcntl
import os
import struct
import threading

import pytest
from conftest import check_no_fd_leak, variant_params
from hypothesis import given
from hypothesis import strategies as st

from vhostuser.errors import UnsupportedVariant
from vhostuser.sys_util import (
    AVAILABLE_EVENT_KINDS,
    DEFAULT_EVENT_KIND,
    EventConsumer,
    EventKind,
    EventNotifier,
    new_event_consumer_and_notifier,
)

KINDS = variant_params(EventKind, AVAILABLE_EVENT_KINDS)
needs_eventfd = pytest.mark.skipif(not hasattr(os, "eventfd"), reason="no eventfd")


@pytest.fixture(params=KINDS)
def pair(request: pytest.FixtureRequest, no_fd_leak: None):
    consumer, notifier = new_event_consumer_and_notifier(request.param)
    with consumer, notifier:
        yield consumer, notifier


def _is_nonblocking_cloexec(fd: int) -> bool:
    return not os.get_blocking(fd) and bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)


def test_pair_fds_are_distinct_nonblocking_cloexec(pair) -> None:
    consumer, notifier = pair
    assert consumer.fileno() != notifier.fileno()
    assert _is_nonblocking_cloexec(consumer.fileno())
    assert _is_nonblocking_cloexec(notifier.fileno())


def test_nothing_pending_initially(pair) -> None:
    consumer, _ = pair
    assert consumer.consume() is False


@pytest.mark.parametrize("kind", KINDS)
@given(n=st.integers(min_value=1, max_value=200))
def test_n_notifies_consume_once(kind: EventKind, n: int) -> None:
    with check_no_fd_leak():
        consumer, notifier = new_event_consumer_and_notifier(kind)
        with consumer, notifier:
            for _ in range(n):
                notifier.notify()
            assert consumer.consume() is True
            assert consumer.consume() is False


def test_notify_on_full_pipe_does_not_block(no_fd_leak: None) -> None:
    consumer, notifier = new_event_consumer_and_notifier(EventKind.PIPE)
    with consumer, notifier:
        for chunk in (4096, 1):  # fill to the last byte
            with pytest.raises(BlockingIOError):
                while True:
                    os.write(notifier.fileno(), b"\0" * chunk)
        notifier.notify()  # EAGAIN: already signalled
        notifier.notify()
        assert consumer.consume() is True
        assert consumer.consume() is False


@needs_eventfd
def test_notify_on_saturated_eventfd_does_not_block(no_fd_leak: None) -> None:
    consumer, notifier = new_event_consumer_and_notifier(EventKind.EVENTFD)
    with consumer, notifier:
        os.write(notifier.fileno(), struct.pack("=Q", 0xFFFF_FFFF_FFFF_FFFE))  # the maximum count
        notifier.notify()
        assert consumer.consume() is True
        assert consumer.consume() is False


def test_signal_is_native_u64_one(pair) -> None:
    consumer, notifier = pair
    notifier.notify()
    assert os.read(consumer.fileno(), 8) == struct.pack("=Q", 1)


def test_notify_from_another_thread(pair) -> None:
    consumer, notifier = pair
    thread = threading.Thread(target=notifier.notify)
    thread.start()
    thread.join(timeout=10)
    assert consumer.consume() is True


def test_close_is_independent_and_idempotent(pair) -> None:
    consumer, notifier = pair
    notifier.notify()
    notifier.close()
    notifier.close()
    assert notifier.closed
    assert consumer.consume() is True
    with pytest.raises(ValueError, match="closed"):
        notifier.notify()


def test_consume_after_pipe_writer_closed_returns(no_fd_leak: None) -> None:
    consumer, notifier = new_event_consumer_and_notifier(EventKind.PIPE)
    with consumer:
        notifier.notify()
        notifier.close()
        assert consumer.consume() is True
        assert consumer.consume() is False  # EOF, not a hang


def test_detach_and_try_clone(pair) -> None:
    consumer, notifier = pair
    clone = notifier.try_clone()
    with clone:
        assert clone.fileno() != notifier.fileno()
        assert _is_nonblocking_cloexec(clone.fileno())
        clone.notify()
        assert consumer.consume() is True
    fd = notifier.detach()
    assert notifier.closed
    with EventNotifier(fd) as again:
        again.notify()
        assert consumer.consume() is True


def _raw_pipe() -> tuple[int, int]:
    rfd, wfd = os.pipe()
    os.set_blocking(rfd, True)
    os.set_blocking(wfd, True)
    return rfd, wfd


def _raw_eventfd(flags: int = 0) -> tuple[int, int]:
    fd = os.eventfd(0, flags)  # blocking, as a peer might create it
    return fd, os.dup(fd)


ADOPTED = [
    pytest.param(_raw_pipe, id="pipe"),
    pytest.param(_raw_eventfd, id="eventfd", marks=needs_eventfd),
    pytest.param(
        lambda: _raw_eventfd(os.EFD_SEMAPHORE), id="eventfd-semaphore", marks=needs_eventfd
    ),
]


@pytest.mark.parametrize("make", ADOPTED)
def test_from_fd_adopts_fds_of_either_kind(make, no_fd_leak: None) -> None:
    rfd, wfd = make()
    with EventConsumer.from_fd(rfd) as consumer, EventNotifier.from_fd(wfd) as notifier:
        assert not os.get_blocking(rfd) and not os.get_blocking(wfd)
        assert consumer.consume() is False  # does not block on an adopted blocking fd
        for _ in range(3):
            notifier.notify()
        assert consumer.consume() is True
        assert consumer.consume() is False


def test_default_kind_and_env_switch(monkeypatch: pytest.MonkeyPatch, no_fd_leak: None) -> None:
    monkeypatch.setenv("VHOSTUSER_NOTIFIER", "pipe")
    consumer, notifier = new_event_consumer_and_notifier()
    with consumer, notifier:
        assert fcntl.fcntl(consumer.fileno(), fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
    monkeypatch.delenv("VHOSTUSER_NOTIFIER")
    assert DEFAULT_EVENT_KIND in AVAILABLE_EVENT_KINDS
    assert DEFAULT_EVENT_KIND is (EventKind.EVENTFD if hasattr(os, "eventfd") else EventKind.PIPE)


def test_unknown_kind_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UnsupportedVariant, match="expected one of"):
        new_event_consumer_and_notifier("futex")
    monkeypatch.setenv("VHOSTUSER_NOTIFIER", "bogus")
    with pytest.raises(UnsupportedVariant, match="VHOSTUSER_NOTIFIER"):
        new_event_consumer_and_notifier()
