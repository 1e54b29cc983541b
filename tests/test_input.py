"""virtio-input: the Linux driver's probe and event handling (played by
VirtioInputDriver over the mock front-end), the virtual devices and their control
socket, evdev passthrough from a fake evdev device, and hostile driver input."""
from __future__ import annotations

import os
import socket
import stat
import struct
import time
from pathlib import Path

import pytest

from vhostuser.devices.control_socket import LineServer, request
from vhostuser.devices.input import InputBackend, InputEvent, VirtualInput
from vhostuser.devices.input import codes
from vhostuser.devices.input.config import CONFIG_SIZE, EVENT_QUEUE, STATUS_QUEUE, AbsInfo, ConfigSelect, DevIds
from vhostuser.devices.input.device import MAX_PENDING
from vhostuser.devices.input.sources import EvdevInput
from vhostuser.errors import RequestFailed
from vhostuser.sys_util import evdev
from vhostuser.testing import FrontendOptions
from vhostuser.testing.input_driver import VirtioInputDriver

from helpers.procs import vhostuser_process, wait_for_path

OPTIONS = FrontendOptions(config_size=CONFIG_SIZE, queue_size=64)
K, S = codes.EV_KEY, codes.EV_SYN


def key(code: int, value: int) -> list[InputEvent]:
    return [InputEvent(K, code, value), InputEvent(S, 0, 0)]


def connect(serve_backend, mock_frontend_factory, source):
    backend = InputBackend(source)
    path = serve_backend(backend)
    fe = mock_frontend_factory(path, OPTIONS)
    return backend, VirtioInputDriver(fe)


def test_probe_reads_what_the_keyboard_declares(serve_backend, mock_frontend_factory):
    _, drv = connect(serve_backend, mock_frontend_factory, VirtualInput("keyboard", name="kbd", serial="sn-1"))
    dev = drv.probe()
    assert (dev.name, dev.serial) == ("kbd", "sn-1")
    assert dev.devids == DevIds(0x06, 0, 0, 0)
    assert dev.events[codes.EV_KEY] == set(codes.KEYS.values())
    assert codes.EV_REP in dev.events
    assert dev.events[codes.EV_LED] == {codes.LED_NUML, codes.LED_CAPSL, codes.LED_SCROLLL}
    assert codes.EV_REL not in dev.events and codes.EV_ABS not in dev.events
    # unsupported queries answer size 0 (the union is not read)
    assert (ConfigSelect.EV_BITS, codes.EV_SND, 0) in drv.queries


def test_probe_of_the_tablet_reads_abs_info(serve_backend, mock_frontend_factory):
    _, drv = connect(serve_backend, mock_frontend_factory, VirtualInput("tablet"))
    dev = drv.probe()
    assert dev.events[codes.EV_ABS] == {codes.ABS_X, codes.ABS_Y}
    assert dev.absinfo == {codes.ABS_X: AbsInfo(0, 0x7FFF), codes.ABS_Y: AbsInfo(0, 0x7FFF)}
    assert (ConfigSelect.ABS_INFO, codes.ABS_Y, 20) in drv.queries


def test_typed_text_arrives_as_key_groups(serve_backend, mock_frontend_factory):
    kbd = VirtualInput("keyboard")
    _, drv = connect(serve_backend, mock_frontend_factory, kbd)
    drv.probe()
    kbd.type_text("Hi!\n")
    shift, h, i, one, enter = (codes.KEYS[n] for n in ("LEFTSHIFT", "H", "I", "1", "ENTER"))
    expected = (key(shift, 1) + key(h, 1) + key(h, 0) + key(shift, 0) + key(i, 1) + key(i, 0)
                + key(shift, 1) + key(one, 1) + key(one, 0) + key(shift, 0) + key(enter, 1) + key(enter, 0))
    assert drv.events(len(expected)) == expected


def test_events_before_the_driver_has_buffers_wait_and_are_flushed_on_its_kick(serve_backend, mock_frontend_factory):
    mouse = VirtualInput("mouse")
    backend, drv = connect(serve_backend, mock_frontend_factory, mouse)
    mouse.move(5, -3)
    mouse.click("right")
    deadline = time.monotonic() + 5
    while len(backend.pending) < 7 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(backend.pending) == 7  # nowhere to go yet
    drv.probe()  # fills the event queue and kicks
    got = drv.events(7)
    assert got == [InputEvent(codes.EV_REL, codes.REL_X, 5), InputEvent(codes.EV_REL, codes.REL_Y, -3),
                   InputEvent(S, 0, 0)] + key(codes.BTN_RIGHT, 1) + key(codes.BTN_RIGHT, 0)


def test_more_events_than_buffers_come_as_the_driver_requeues(serve_backend, mock_frontend_factory):
    kbd = VirtualInput("keyboard")
    backend = InputBackend(kbd)
    fe = mock_frontend_factory(serve_backend(backend), OPTIONS)
    drv = VirtioInputDriver(fe, event_buffers=4)
    drv.probe()
    kbd.type_text("abcdefghij")  # 40 events through 4 buffers
    got = drv.events(40)
    assert [e.code for e in got if e.type == K and e.value == 1] == [codes.KEYS[c] for c in "ABCDEFGHIJ"]


def test_status_leds_reach_the_source_and_the_control_reply(serve_backend, mock_frontend_factory):
    kbd = VirtualInput("keyboard")
    backend, drv = connect(serve_backend, mock_frontend_factory, kbd)
    drv.probe()
    drv.send_status(codes.EV_LED, codes.LED_CAPSL, 1)
    assert kbd.leds == {codes.LED_CAPSL: True}
    assert kbd.command("leds") == "OK num=off caps=on scroll=off"
    assert backend.status_events == [InputEvent(codes.EV_LED, codes.LED_CAPSL, 1)]


def test_pending_events_are_bounded(serve_backend, mock_frontend_factory):
    kbd = VirtualInput("keyboard")
    backend = InputBackend(kbd)
    backend.push([InputEvent(K, 30, 1)] * (MAX_PENDING + 10))
    assert len(backend.pending) == MAX_PENDING and backend.dropped == 10
    backend.close()


# ------------------------------------------------------------------ hostile driver
def test_bad_config_writes_and_short_buffers_fail_cleanly(serve_backend, mock_frontend_factory):
    kbd = VirtualInput("keyboard")
    backend, drv = connect(serve_backend, mock_frontend_factory, kbd)
    fe = drv.fe
    with pytest.raises(RequestFailed):
        fe.set_config(2, b"\x05")  # size is read-only
    with pytest.raises(RequestFailed):
        fe.get_config(130, 10)  # beyond the config space
    # a 4-byte event buffer comes back empty; the next proper one gets the event
    fe.add(EVENT_QUEUE, [], [4])
    fe.add(EVENT_QUEUE, [], [8])
    fe.publish(EVENT_QUEUE, force_kick=True)
    kbd.key("a")
    used = fe.wait_used(EVENT_QUEUE, 2)
    assert [u.length for u in used[:2]] == [0, 8]
    assert InputEvent.unpack(used[1].data) == InputEvent(K, codes.KEYS["A"], 1)
    # a short status buffer is ignored, the device keeps serving
    assert fe.request(STATUS_QUEUE, [b"\x11\x00"], []).length == 0
    assert backend.status_events == []
    drv.probe()
    assert drv.device.name == kbd.config.name


# ------------------------------------------------------------------ control socket
def test_control_socket_is_private_and_serves_several_clients(no_fd_leak, tmp_path, serve_backend,
                                                            mock_frontend_factory):
    kbd = VirtualInput("keyboard")
    _, drv = connect(serve_backend, mock_frontend_factory, kbd)
    drv.probe()
    path = str(tmp_path / "kbd.ctl")
    server = LineServer(path, kbd.command)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        with socket.socket(socket.AF_UNIX) as a, socket.socket(socket.AF_UNIX) as b:
            a.connect(path)
            b.connect(path)
            b.sendall(b"bogus\n")
            a.sendall(b"key enter\n")
            assert b.recv(4096).startswith(b"ERROR bad command 'bogus'")
            assert a.recv(4096) == b"OK\n"
        assert request(path, "type q") == "OK"
        assert request(path, "move 1 2").startswith("ERROR")  # a keyboard does not move
        assert request(path, "key NOSUCHKEY").startswith("ERROR")
        got = drv.events(8)
        assert got == key(codes.KEYS["ENTER"], 1) + key(codes.KEYS["ENTER"], 0) + key(codes.KEYS["Q"], 1) + \
            key(codes.KEYS["Q"], 0)
        time.sleep(0.1)
        assert drv.poll_events() == []  # the refused commands sent nothing
    finally:
        server.close()
    assert not os.path.exists(path)


def test_tablet_and_mouse_commands():
    tab = VirtualInput("tablet")
    assert tab.command("move 100 32767") == "OK"
    with pytest.raises(ValueError, match="outside 0..32767"):
        tab.command("move 100 40000")
    tab.command("wheel -1")
    tab.command("button middle down")
    assert tab.read_events() == [InputEvent(codes.EV_ABS, 0, 100), InputEvent(codes.EV_ABS, 1, 32767),
                                 InputEvent(S, 0, 0), InputEvent(codes.EV_REL, codes.REL_WHEEL, -1),
                                 InputEvent(S, 0, 0)] + key(codes.BTN_MIDDLE, 1)
    tab.close()


# ------------------------------------------------------------------ evdev passthrough
class FakeEvdev:
    """A fake /dev/input/eventN: a socketpair carries struct input_event both
    ways, and :meth:`ioctl` answers the EVIOCG* requests as the kernel would,
    decoding the request numbers itself (from linux/input.h)."""

    def __init__(self) -> None:
        self.device, self.host = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.device.setblocking(False)
        self.grabbed = None
        self.keys = {codes.KEYS["A"], codes.KEYS["B"], codes.BTN_LEFT}

    def ioctl(self, fd: int, req: int, arg: bytes) -> bytes:
        assert fd == self.device.fileno()
        direction, size, kind, nr = req >> 30, (req >> 16) & 0x3FFF, (req >> 8) & 0xFF, req & 0xFF
        assert kind == ord("E")
        if direction == 1 and nr == 0x90:  # EVIOCGRAB
            self.grabbed = struct.unpack("i", arg)[0]
            return arg
        assert direction == 2 and size == len(arg)
        if nr == 0x02:
            return struct.pack("<HHHH", 0x03, 0x046D, 0xC52B, 0x0111)
        if nr == 0x06:
            return b"Fake Evdev Keyboard\0".ljust(size, b"\0")
        if nr == 0x08:
            raise OSError(2, "no uniq")
        if nr == 0x09:
            return bytes(size)
        if 0x20 <= nr < 0x40:
            bits = {0: {codes.EV_SYN, codes.EV_KEY, codes.EV_ABS, codes.EV_LED}, codes.EV_KEY: self.keys,
                    codes.EV_ABS: {codes.ABS_X}, codes.EV_LED: {codes.LED_CAPSL}}.get(nr - 0x20, set())
            out = bytearray(size)
            for b in bits:
                out[b // 8] |= 1 << (b % 8)
            return bytes(out)
        if nr == 0x40 + codes.ABS_X:
            return struct.pack("<iiiiii", 7, -100, 100, 1, 2, 3)
        raise OSError(22, f"unexpected ioctl nr {nr:#x}")

    def send(self, *events: tuple[int, int, int]) -> None:
        self.host.sendall(b"".join(evdev.encode_event(*e) for e in events))


@pytest.fixture
def fake_evdev():
    fake = FakeEvdev()
    yield fake
    fake.host.close()


def test_evdev_passthrough(no_fd_leak, fake_evdev, serve_backend, mock_frontend_factory):
    source = EvdevInput(os.dup(fake_evdev.device.fileno()), ioctl=lambda fd, req, arg: fake_evdev.ioctl(
        fake_evdev.device.fileno(), req, arg), grab=True)
    fake_evdev.device.close()
    assert fake_evdev.grabbed == 1
    _, drv = connect(serve_backend, mock_frontend_factory, source)
    dev = drv.probe()
    assert dev.name == "Fake Evdev Keyboard" and dev.serial == ""
    assert dev.devids == DevIds(0x03, 0x046D, 0xC52B, 0x0111)
    assert dev.events == {codes.EV_KEY: fake_evdev.keys, codes.EV_ABS: {codes.ABS_X}, codes.EV_LED: {codes.LED_CAPSL}}
    assert dev.absinfo == {codes.ABS_X: AbsInfo(-100, 100, 1, 2, 3)}
    # events forwarded, even when a record arrives in two pieces
    record = evdev.encode_event(K, codes.KEYS["B"], 1) + evdev.encode_event(S, 0, 0)
    fake_evdev.host.sendall(record[:10])
    time.sleep(0.05)
    fake_evdev.host.sendall(record[10:])
    fake_evdev.send((codes.EV_ABS, codes.ABS_X, -42), (S, 0, 0))
    assert drv.events(4) == key(codes.KEYS["B"], 1) + [InputEvent(codes.EV_ABS, codes.ABS_X, -42), InputEvent(S, 0, 0)]
    # the LED the guest sets goes back to the device
    drv.send_status(codes.EV_LED, codes.LED_CAPSL, 1)
    fake_evdev.host.settimeout(5)
    assert evdev.decode_events(fake_evdev.host.recv(evdev.EVENT_SIZE))[0] == [(codes.EV_LED, codes.LED_CAPSL, 1)]
    # the device unplugged: the back-end keeps serving config
    fake_evdev.host.close()
    time.sleep(0.1)
    assert drv.cfg_select(ConfigSelect.ID_NAME, 0) == len("Fake Evdev Keyboard")


def test_evdev_ioctl_numbers_match_linux_input_h():
    # values from a C program including <linux/input.h> on x86_64
    assert evdev.eviocgid() == 0x80084502
    assert evdev.eviocgname(256) == 0x81004506
    assert evdev.eviocgbit(codes.EV_KEY, 96) == 0x80604521
    assert evdev.eviocgabs(codes.ABS_Y) == 0x80184541
    assert evdev.EVIOCGRAB == 0x40044590
    assert evdev.EVENT_SIZE == 24


# ------------------------------------------------------------------ command
def test_input_command_with_a_control_socket(vhost_socket_dir, mock_frontend_factory):
    sock = Path(vhost_socket_dir) / "in.sock"
    ctl = Path(vhost_socket_dir) / "in.ctl"
    with vhostuser_process(["input", "--socket-path", str(sock), "--virtual", "mouse",
                            "--control-socket", str(ctl), "--name", "scripted mouse"]) as proc:
        wait_for_path(sock, proc)
        wait_for_path(ctl, proc)
        drv = VirtioInputDriver(mock_frontend_factory(str(sock), OPTIONS))
        assert drv.probe().name == "scripted mouse"
        assert request(str(ctl), "click left") == "OK"
        assert drv.events(4) == key(codes.BTN_LEFT, 1) + key(codes.BTN_LEFT, 0)
        drv.fe.close()
        proc.terminate()
        proc.wait(30)
    assert proc.returncode == 0 and not ctl.exists()


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 255), st.integers(0, 255))
def test_every_config_query_is_a_well_formed_answer(select, subsel):
    from vhostuser.devices.input.config import tablet_config

    space = tablet_config().space(select, subsel)
    assert len(space) == CONFIG_SIZE and space[:2] == bytes([select, subsel])
    assert space[2] <= 128 and space[8 + space[2]:] == bytes(128 - space[2])
