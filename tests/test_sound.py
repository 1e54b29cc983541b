"""virtio-snd: the Linux driver's sequence (VirtioSndDriver over the mock
front-end), the PCM state machine, real-time pacing, hostile messages, and the
per-direction enable flags over the control socket."""
from __future__ import annotations

import os
import socket
import stat
import struct
import time
import wave
from pathlib import Path

import pytest

from helpers.procs import vhostuser_process, wait_for_path
from helpers.sound import RecordingHost, frequency, sine
from vhostuser.devices.control_socket import LineServer, request
from vhostuser.devices.sound import FileHost, SoundBackend
from vhostuser.devices.sound.protocol import (
    CHMAP_FL,
    CHMAP_FR,
    PCM_SET_PARAMS,
    PCM_STATUS,
    RATE_INDEX,
    RX_QUEUE,
    TX_QUEUE,
    XFER,
    Code,
    Direction,
    Format,
)
from vhostuser.testing import FrontendOptions
from vhostuser.testing.sound_driver import PcmRun, VirtioSndDriver

OPTIONS = FrontendOptions(config_size=12, queue_size=64)
RATE = 16000
PERIOD_FRAMES = 400  # 25 ms at 16 kHz
PERIOD = PERIOD_FRAMES / RATE
OK, BAD, NOT_SUPP = Code.S_OK, Code.S_BAD_MSG, Code.S_NOT_SUPP


@pytest.fixture
def snd(serve_backend, mock_frontend_factory):
    """(backend factory result, driver) for a SoundBackend built from kwargs."""
    def make(**kw):
        backend = SoundBackend(**kw)
        drv = VirtioSndDriver(mock_frontend_factory(serve_backend(backend), OPTIONS))
        drv.probe()
        return backend, drv
    return make


def test_probe_sees_one_output_and_one_input_stream_jacks_and_chmaps(snd):
    _, drv = snd()
    p = drv.probed
    assert [s[4] for s in p.streams] == [Direction.OUTPUT, Direction.INPUT]
    for _, features, formats, rates, _, ch_min, ch_max in p.streams:
        assert formats & (1 << Format.S16) and rates & (1 << RATE_INDEX[48000]) and (ch_min, ch_max) == (1, 2)
        assert features == 1 << 4  # EVT_XRUNS
    assert [j[4] for j in p.jacks] == [1, 1]  # connected
    assert [(c[1], c[2], c[3][:2]) for c in p.chmaps] == [(0, 2, bytes([CHMAP_FL, CHMAP_FR])),
                                                          (1, 2, bytes([CHMAP_FL, CHMAP_FR]))]


def test_playback_follows_the_driver_sequence_into_a_wav_file_at_the_real_rate(tmp_path, snd):
    out = tmp_path / "out.wav"
    backend, drv = snd(host=FileHost(output_path=str(out)))
    wave_src = sine(440, RATE)
    sent = bytearray()

    def source(n):
        data = wave_src(n)
        sent.extend(data)
        return data
    run = PcmRun(drv, 0, Direction.OUTPUT, rate=RATE, channels=1, period_frames=PERIOD_FRAMES, source=source)
    t0 = time.monotonic()
    run.start()
    done = run.pump(20)
    elapsed = time.monotonic() - t0
    run.stop()
    assert run.status == {"set_params": OK, "prepare": OK, "start": OK, "stop": OK, "release": OK}
    assert all(c.status == OK for c in run.completed) and run.outstanding == 0
    # 20 periods of 25 ms were played in real time: not faster (pacing), not far slower
    assert elapsed >= 19 * PERIOD, elapsed
    assert elapsed < 20 * PERIOD + 3.0, elapsed
    assert len(done) == 20
    with wave.open(str(out)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, RATE)
        played = w.readframes(w.getnframes())
    assert len(played) >= 20 * PERIOD_FRAMES * 2 and sent.startswith(played)
    assert abs(frequency(played, RATE) - 440) < 5


def test_capture_reads_the_input_wav_and_then_silence(tmp_path, snd):
    src = tmp_path / "in.wav"
    tone = sine(1000, RATE)(PERIOD_FRAMES * 2 * 3)  # three periods, mono S16
    with wave.open(str(src), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(RATE)
        w.writeframes(tone)
    _, drv = snd(host=FileHost(input_path=str(src)))
    run = PcmRun(drv, 1, Direction.INPUT, rate=RATE, channels=1, period_frames=PERIOD_FRAMES)
    run.start()
    got = run.pump(5)
    run.stop()
    assert b"".join(c.frames for c in got[:3]) == tone
    assert got[3].frames == bytes(PERIOD_FRAMES * 2) and all(c.status == OK for c in got)


# ------------------------------------------------------------------ state machine and parameters
def test_invalid_transitions_answer_bad_msg_and_change_nothing(snd):
    _, drv = snd()
    pcm = drv.pcm
    assert pcm(Code.R_PCM_PREPARE, 0) == BAD        # no parameters yet
    assert pcm(Code.R_PCM_START, 0) == BAD
    assert drv.set_params(0, buffer_bytes=4096, period_bytes=1024) == OK
    assert pcm(Code.R_PCM_START, 0) == BAD          # not prepared
    assert pcm(Code.R_PCM_STOP, 0) == BAD
    assert pcm(Code.R_PCM_RELEASE, 0) == BAD
    assert pcm(Code.R_PCM_PREPARE, 0) == OK
    assert pcm(Code.R_PCM_PREPARE, 0) == OK         # PREPARE again is allowed
    assert pcm(Code.R_PCM_STOP, 0) == BAD
    assert pcm(Code.R_PCM_START, 0) == OK
    assert pcm(Code.R_PCM_START, 0) == BAD
    assert pcm(Code.R_PCM_RELEASE, 0) == BAD        # must STOP first
    assert drv.set_params(0, buffer_bytes=4096, period_bytes=1024) == BAD  # not while running
    assert pcm(Code.R_PCM_STOP, 0) == OK
    assert pcm(Code.R_PCM_START, 0) == OK           # STOP -> START resumes
    assert pcm(Code.R_PCM_STOP, 0) == OK
    assert pcm(Code.R_PCM_RELEASE, 0) == OK
    assert pcm(Code.R_PCM_START, 0) == BAD
    assert pcm(Code.R_PCM_PREPARE, 0) == OK         # RELEASE -> PREPARE
    assert pcm(Code.R_PCM_RELEASE, 0) == OK
    assert drv.set_params(0, buffer_bytes=4096, period_bytes=1024) == OK


@pytest.mark.parametrize("change, expected", [
    (dict(rate=5512), NOT_SUPP), (dict(channels=3), NOT_SUPP), (dict(fmt=1), NOT_SUPP),
    (dict(features=1 << 0), NOT_SUPP), (dict(period_bytes=0), BAD), (dict(period_bytes=1023), BAD),
    (dict(buffer_bytes=1000), BAD), (dict(stream=7), BAD),
])
def test_bad_parameters(snd, change, expected):
    _, drv = snd()
    p = dict(stream=0, buffer_bytes=4096, period_bytes=1024, features=0, channels=2, fmt=Format.S16,
             rate=RATE_INDEX[48000])
    if "rate" in change:
        change = dict(change, rate=RATE_INDEX[change["rate"]])
    p.update(change)
    req = PCM_SET_PARAMS.pack(Code.R_PCM_SET_PARAMS, p["stream"], p["buffer_bytes"], p["period_bytes"],
                              p["features"], p["channels"], p["fmt"], p["rate"])
    assert drv.control(req)[0] == expected
    assert drv.pcm(Code.R_PCM_PREPARE, 0) == BAD  # the refused parameters were not taken


def test_malformed_control_requests(snd):
    backend, drv = snd()
    assert drv.control(b"\x01\x01")[0] == BAD                              # no header
    assert drv.control(struct.pack("<I", 0x0999))[0] == NOT_SUPP            # unknown code
    assert drv.control(struct.pack("<II", Code.R_PCM_START, 0))[0] == BAD   # pcm header ok, bad state
    assert drv.control(struct.pack("<I", Code.R_PCM_START))[0] == BAD       # short pcm header
    assert drv.control(struct.pack("<IIII", Code.R_PCM_INFO, 1, 2, 32), 64)[0] == BAD   # beyond the streams
    assert drv.control(struct.pack("<IIII", Code.R_PCM_INFO, 0, 2, 8), 64)[0] == BAD    # item size too small
    assert drv.control(struct.pack("<IIII", Code.R_JACK_REMAP, 5, 1, 1))[0] == BAD
    assert drv.control(struct.pack("<IIII", Code.R_JACK_REMAP, 1, 3, 4))[0] == OK
    assert (backend.jacks[1].association, backend.jacks[1].sequence) == (3, 4)
    # a reply that does not fit: status only
    used = drv.fe.request(0, [struct.pack("<IIII", Code.R_PCM_INFO, 0, 2, 32)], [10])
    assert struct.unpack_from("<I", used.data)[0] == BAD
    assert drv.probe().streams  # still serving


def test_hostile_io_messages_get_a_status_and_the_stream_keeps_playing(snd):
    _, drv = snd()
    fe = drv.fe

    def xfer(queue, readable, writable):
        used = fe.request(queue, readable, writable)
        return used.length, (PCM_STATUS.unpack(used.data[used.length - 8:used.length])[0] if used.length >= 8
                             else None)
    hdr0, hdr1 = XFER.pack(0), XFER.pack(1)
    assert xfer(TX_QUEUE, [hdr0, bytes(64)], [8]) == (8, BAD)          # stream not prepared
    run = PcmRun(drv, 0, Direction.OUTPUT, rate=RATE, channels=1, period_frames=PERIOD_FRAMES, periods=2)
    run.start()
    assert xfer(TX_QUEUE, [hdr1, bytes(64)], [8]) == (8, BAD)          # input stream on the tx queue
    assert xfer(TX_QUEUE, [XFER.pack(9), bytes(64)], [8]) == (8, BAD)  # no such stream
    assert xfer(TX_QUEUE, [b"\x00\x00"], [8]) == (8, BAD)              # short header
    assert xfer(TX_QUEUE, [hdr0, bytes(run.period_bytes * 2 + 2)], [8]) == (8, BAD)  # bigger than the buffer
    assert xfer(TX_QUEUE, [hdr0, bytes(3)], [8]) == (8, BAD)           # not whole frames
    assert xfer(TX_QUEUE, [hdr0, bytes(64)], [4]) == (0, None)         # no room for the status
    assert xfer(RX_QUEUE, [hdr0], [64, 8]) == (72, BAD)                # output stream on the rx queue
    assert [c.status for c in run.pump(4)] == [OK] * 4
    run.stop()
    assert run.status["release"] == OK and run.outstanding == 0


def test_underrun_is_reported_as_an_xrun_event(snd):
    backend, drv = snd()
    run = PcmRun(drv, 0, Direction.OUTPUT, rate=RATE, channels=1, period_frames=PERIOD_FRAMES, periods=2,
                 features=1 << 4)
    run.start()
    time.sleep(PERIOD * 8)  # the driver does not requeue: the device runs dry
    deadline = time.monotonic() + 5
    events = []
    while not events and time.monotonic() < deadline:
        events = drv.events()
        time.sleep(0.02)
    assert (Code.EVT_PCM_XRUN, 0) in events
    assert backend.streams[0].xruns > 0
    run.stop()


def test_jack_events(snd):
    backend, drv = snd()
    backend.jack_event(0, False)
    deadline = time.monotonic() + 5
    events = []
    while not events and time.monotonic() < deadline:
        events = drv.events()
    assert events == [(Code.EVT_JACK_DISCONNECTED, 0)]


# ------------------------------------------------------------------ enable flags
def test_disabled_input_never_leaks_a_sample(snd):
    host = RecordingHost(b"\x07")
    _, drv = snd(host=host, input_enabled=False)
    run = PcmRun(drv, 1, Direction.INPUT, rate=RATE, channels=1, period_frames=PERIOD_FRAMES)
    run.start()
    got = run.pump(12)
    run.stop()
    assert all(c.status == OK for c in got)
    assert b"".join(c.frames for c in got) == bytes(12 * PERIOD_FRAMES * 2)
    assert host.reads == []  # the host was never even read


def test_toggling_over_the_control_socket_takes_effect_within_a_period(tmp_path, snd):
    host = RecordingHost(b"\x07")
    backend, drv = snd(host=host)
    ctl = str(tmp_path / "snd.ctl")
    server = LineServer(ctl, backend.command)
    try:
        out = PcmRun(drv, 0, Direction.OUTPUT, rate=RATE, channels=1, period_frames=PERIOD_FRAMES,
                     source=sine(440, RATE))
        inp = PcmRun(drv, 1, Direction.INPUT, rate=RATE, channels=1, period_frames=PERIOD_FRAMES)
        out.start()
        inp.start()
        out.pump(3)
        inp.pump(3)
        assert request(ctl, "SET input off") == "OK output=on input=off"
        inp.collect()  # completed before the switch (the device completes under the lock SET takes)
        assert request(ctl, "SET output off") == "OK output=off input=off"
        t_out_off = time.monotonic()
        got_in = inp.pump(6)
        got_out = out.pump(6)
        # input: everything completed after the reply is silence; output: nothing reached the host
        assert all(c.frames == bytes(len(c.frames)) for c in got_in)
        assert all(t <= t_out_off for t, _ in host.writes)
        assert all(c.status == OK for c in got_out)  # the guest still gets its buffers back
        assert request(ctl, "QUERY") == "OK output=off input=off"
        assert request(ctl, "SET input on") == "OK output=off input=on"
        t_in_on = time.monotonic()
        assert request(ctl, "SET output on") == "OK output=on input=on"
        t_out_on = time.monotonic()
        got_in = inp.pump(6)
        out.pump(6)
        first_signal = min(c.at for c in got_in if c.frames and c.frames[0] == 7)
        assert first_signal - t_in_on < 2 * PERIOD + 0.5
        first_write = min(t for t, _ in host.writes if t > t_out_on)
        assert first_write - t_out_on < 2 * PERIOD + 0.5
        assert host.flushes >= 1  # input buffered by the host while disabled was dropped
        out.stop()
        inp.stop()
    finally:
        server.close()


def test_control_socket_protocol(tmp_path):
    backend = SoundBackend(output_enabled=True, input_enabled=False)
    ctl = str(tmp_path / "snd.ctl")
    server = LineServer(ctl, backend.command)
    try:
        assert stat.S_IMODE(os.stat(ctl).st_mode) == 0o600
        for bad in ("SET input maybe", "SET mic on", "SET input", "query please", ""):
            assert request(ctl, bad).startswith("ERROR"), bad
        assert request(ctl, "QUERY") == "OK output=on input=off"  # the errors changed nothing
        with socket.socket(socket.AF_UNIX) as a, socket.socket(socket.AF_UNIX) as b:
            a.connect(ctl)
            b.connect(ctl)
            a.sendall(b"SET input on\nQUERY\n")
            reply = b""
            while reply.count(b"\n") < 2:
                reply += a.recv(4096)
            assert reply == b"OK output=on input=on\nOK output=on input=on\n"
            b.sendall(b"SET output off\n")
            assert b.recv(4096) == b"OK output=off input=on\n"
    finally:
        server.close()
    backend.close()


def test_sound_command(vhost_socket_dir, mock_frontend_factory, tmp_path):
    sock = Path(vhost_socket_dir) / "snd.sock"
    ctl = Path(vhost_socket_dir) / "snd.ctl"
    out = tmp_path / "out.wav"
    with vhostuser_process(["sound", "--socket-path", str(sock), "--backend", "file", "--output-file", str(out),
                            "--initial-streams", "output", "--control-socket", str(ctl)]) as proc:
        wait_for_path(sock, proc)
        wait_for_path(ctl, proc)
        assert request(str(ctl), "QUERY") == "OK output=on input=off"
        drv = VirtioSndDriver(mock_frontend_factory(str(sock), OPTIONS))
        assert len(drv.probe().streams) == 2
        run = PcmRun(drv, 0, Direction.OUTPUT, rate=RATE, channels=1, period_frames=PERIOD_FRAMES,
                     source=sine(300, RATE))
        run.start()
        run.pump(4)
        run.stop()
        drv.fe.close()
        proc.terminate()
        proc.wait(30)
    assert proc.returncode == 0 and not ctl.exists()
    with wave.open(str(out)) as w:
        assert abs(frequency(w.readframes(w.getnframes()), RATE) - 300) < 5


# ------------------------------------------------------------------ fuzz
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_codes = st.sampled_from([c.value for c in Code] + [0, 0xFFFFFFFF])


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(_codes, st.binary(max_size=40)), max_size=12))
def test_any_control_request_sequence_gets_a_status_and_never_raises(requests):
    backend = SoundBackend()
    try:
        for code, rest in requests:
            reply = backend.control_reply(struct.pack("<I", code) + rest)
            (status,) = struct.unpack_from("<I", reply)
            assert status in (OK, BAD, NOT_SUPP, Code.S_IO_ERR)
            assert status == OK or len(reply) == 4
        for s in backend.streams:  # whatever happened, every state is one of the spec's
            assert s.state.name in ("INITIAL", "SET_PARAMETERS", "PREPARE", "START", "STOP", "RELEASE")
    finally:
        backend.close()


def test_playback_survives_a_front_end_reconnect(snd):
    backend, drv = snd()
    run = PcmRun(drv, 0, Direction.OUTPUT, rate=RATE, channels=1, period_frames=PERIOD_FRAMES)
    run.start()
    run.pump(3)
    drv.fe.reconnect()  # QEMU's reconnect=: the rings restart from their used index
    assert all(c.status == OK for c in run.pump(6))
    run.stop()
    assert run.outstanding == 0 and run.status["release"] == OK


def test_no_fd_leak_across_a_stream_and_the_control_socket(no_fd_leak, tmp_path, serve_backend,
                                                          mock_frontend_factory):
    backend = SoundBackend(host=RecordingHost())
    server = LineServer(str(tmp_path / "c.ctl"), backend.command)
    try:
        drv = VirtioSndDriver(mock_frontend_factory(serve_backend(backend), OPTIONS))
        drv.probe()
        run = PcmRun(drv, 1, Direction.INPUT, rate=RATE, channels=1, period_frames=PERIOD_FRAMES)
        run.start()
        assert request(str(tmp_path / "c.ctl"), "SET input off").startswith("OK")
        run.pump(2)
        run.stop()
        drv.fe.close()
        serve_backend.daemon_of(backend).request_shutdown()
        serve_backend.daemon_of(backend).wait()
    finally:
        server.close()
        backend.close()


def test_a_releasing_host_has_no_stream_open_while_a_direction_is_disabled(snd):
    host = RecordingHost(b"\x07", release_when_disabled=True)
    backend, drv = snd(host=host, input_enabled=False)
    run = PcmRun(drv, 1, Direction.INPUT, rate=RATE, channels=1, period_frames=PERIOD_FRAMES)
    run.start()
    assert host.opened == []  # PREPARE while disabled: the host microphone stays closed
    assert all(c.frames == bytes(len(c.frames)) for c in run.pump(3))
    backend.set_enabled(Direction.INPUT, True)
    assert [o[:2] for o in host.opened] == [(1, Direction.INPUT)]
    run.collect()
    assert any(c.frames[:1] == b"\x07" for c in run.pump(4))
    backend.set_enabled(Direction.INPUT, False)
    assert host.closed == 1 and backend.streams[1].host is None
    run.collect()
    assert all(c.frames == bytes(len(c.frames)) for c in run.pump(3))
    run.stop()
    assert host.closed == 1 and len(host.opened) == 1
