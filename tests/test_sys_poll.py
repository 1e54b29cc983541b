"""Poller over every available selector (epoll, kqueue, poll, select)."""
from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from conftest import variant_params

from vhostuser.errors import UnsupportedVariant
from vhostuser.sys_util import (
    AVAILABLE_EVENT_KINDS,
    AVAILABLE_SELECTOR_KINDS,
    DEFAULT_SELECTOR_KIND,
    EVENT_ERROR,
    EVENT_READ,
    EVENT_WRITE,
    EventKind,
    Poller,
    SelectorKind,
    new_event_consumer_and_notifier,
)

KINDS = variant_params(SelectorKind, AVAILABLE_SELECTOR_KINDS)


@pytest.fixture(params=KINDS)
def poller(request: pytest.FixtureRequest, no_fd_leak: None) -> Iterator[Poller]:
    with Poller(request.param) as p:
        assert p.kind is request.param
        yield p


@pytest.fixture
def sockets(no_fd_leak: None) -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    with a, b:
        yield a, b


def test_readable_with_token(poller: Poller, sockets) -> None:
    a, b = sockets
    poller.register(b, 42)
    assert poller.wait(0) == []
    a.send(b"x")
    assert poller.wait(5) == [(42, EVENT_READ)]
    b.recv(1)
    assert poller.wait(0) == []


def test_modify_and_unregister(poller: Poller, sockets) -> None:
    a, b = sockets
    poller.register(a.fileno(), 1, EVENT_READ)
    assert poller.wait(0) == []
    poller.modify(a, 2, EVENT_READ | EVENT_WRITE)
    assert poller.wait(5) == [(2, EVENT_WRITE)]
    b.send(b"y")
    assert poller.wait(5) == [(2, EVENT_READ | EVENT_WRITE)]
    poller.unregister(a)
    assert poller.wait(0) == []
    with pytest.raises(KeyError):
        poller.unregister(a)


def test_many_fds(poller: Poller, no_fd_leak: None) -> None:
    pairs = [new_event_consumer_and_notifier() for _ in range(20)]
    try:
        for token, (consumer, _) in enumerate(pairs):
            poller.register(consumer, token)
        for token in (3, 7, 19):
            pairs[token][1].notify()
        assert sorted(poller.wait(5)) == [(3, EVENT_READ), (7, EVENT_READ), (19, EVENT_READ)]
        for token, (consumer, _) in enumerate(pairs):
            poller.unregister(consumer)
    finally:
        for consumer, notifier in pairs:
            consumer.close()
            notifier.close()


def test_hangup_reported_as_readable(poller: Poller, no_fd_leak: None) -> None:
    rfd, wfd = os.pipe()
    try:
        poller.register(rfd, 5)
        os.close(wfd)
        # epoll and poll say why (EVENT_ERROR); kqueue and select cannot
        expect = EVENT_READ | EVENT_ERROR if poller.kind in (SelectorKind.EPOLL, SelectorKind.POLL) else EVENT_READ
        assert poller.wait(5) == [(5, expect)]
        poller.unregister(rfd)
    finally:
        os.close(rfd)


def test_error_reported_with_registered_events(poller: Poller, no_fd_leak: None) -> None:
    """A socket whose peer is gone: EVENT_ERROR (epoll, poll) beside the events
    the fd was registered for, and never an event it was not registered for."""
    a, b = socket.socketpair()
    with a, b:
        poller.register(a, 9, EVENT_WRITE)
        assert poller.wait(5) == [(9, EVENT_WRITE)]
        b.close()
        ready = dict(poller.wait(5))
        assert ready[9] & EVENT_WRITE and not ready[9] & EVENT_READ
        if poller.kind in (SelectorKind.EPOLL, SelectorKind.POLL):
            assert ready[9] & EVENT_ERROR
        poller.unregister(a)


def test_bad_fd_rejected(poller: Poller) -> None:
    rfd, wfd = os.pipe()
    os.close(rfd)
    os.close(wfd)
    with pytest.raises(OSError, match=f"cannot register fd {rfd}"):
        poller.register(rfd, 1)
    with pytest.raises(OSError, match="cannot register fd -1"):
        poller.register(-1, 1)
    assert poller.wait(0) == []


def test_wake_from_another_thread(poller: Poller) -> None:
    results: list[list[tuple[int, int]]] = []
    waiter = threading.Thread(target=lambda: results.append(poller.wait(30)))
    start = time.monotonic()
    waiter.start()
    poller.wake()
    waiter.join(timeout=10)
    assert not waiter.is_alive()
    assert results == [[]]  # the wake token is never reported
    assert time.monotonic() - start < 10
    assert poller.wait(0) == []  # and the wake-up was consumed


@pytest.mark.parametrize("event_kind", variant_params(EventKind, AVAILABLE_EVENT_KINDS))
def test_notify_from_another_thread_wakes_wait(poller: Poller, event_kind: EventKind) -> None:
    consumer, notifier = new_event_consumer_and_notifier(event_kind)
    with consumer, notifier:
        poller.register(consumer, 99)
        thread = threading.Thread(target=notifier.notify)
        thread.start()
        assert poller.wait(10) == [(99, EVENT_READ)]
        thread.join(timeout=10)
        assert consumer.consume() is True
        assert poller.wait(0) == []
        poller.unregister(consumer)


def test_close_is_idempotent_and_wake_after_close_is_noop(no_fd_leak: None) -> None:
    poller = Poller()
    poller.close()
    poller.close()
    poller.wake()
    assert poller.closed


def test_env_switch(monkeypatch: pytest.MonkeyPatch, no_fd_leak: None) -> None:
    assert DEFAULT_SELECTOR_KIND in AVAILABLE_SELECTOR_KINDS
    monkeypatch.setenv("VHOSTUSER_SELECTOR", "select")
    with Poller() as p:
        assert p.kind is SelectorKind.SELECT
    monkeypatch.setenv("VHOSTUSER_SELECTOR", "devpoll")
    with pytest.raises(UnsupportedVariant):
        Poller()


def test_unavailable_kind_rejected(no_fd_leak: None) -> None:
    missing = [k for k in SelectorKind if k not in AVAILABLE_SELECTOR_KINDS]
    if not missing:
        pytest.skip("every selector is available here")
    with pytest.raises(UnsupportedVariant, match="not available"):
        Poller(missing[0])
