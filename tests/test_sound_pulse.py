"""The sound device against a real PulseAudio server: the test starts its own
server with a null sink, plays a sine through the device (pulse back-end, the
guest side played by VirtioSndDriver) and reads it back from the sink's monitor
with ``parec`` (pulseaudio-utils): right frequency, right level."""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from helpers.procs import reap
from helpers.sound import median_block_rms, median_frequency, rms, samples, sine
from vhostuser.devices.sound import SoundBackend
from vhostuser.devices.sound.protocol import Direction
from vhostuser.testing import FrontendOptions
from vhostuser.testing.sound_driver import PcmRun, VirtioSndDriver

RATE = 48000
SINK = "vhu_null"


@pytest.fixture
def pulse_server(tmp_path):
    """A private PulseAudio server (null sink ``vhu_null``, mono 48 kHz); yields its address."""
    for tool in ("pulseaudio", "parec"):
        assert shutil.which(tool), f"{tool} is missing: scripts/install-deps --test installs it"
    home = tmp_path / "pa"
    home.mkdir()
    address = f"unix:{home}/native"
    env = dict(os.environ, HOME=str(home), XDG_RUNTIME_DIR=str(home), PULSE_RUNTIME_PATH=str(home),
               PULSE_STATE_PATH=str(home))
    proc = subprocess.Popen(
        ["pulseaudio", "-n", "--daemonize=no", "--exit-idle-time=-1", "--disable-shm=yes", "--use-pid-file=no",
         "-F", "/dev/null", f"--load=module-null-sink sink_name={SINK} rate={RATE} channels=1",
         f"--load=module-native-protocol-unix socket={home}/native auth-anonymous=1"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while subprocess.run(["pactl", "--server", address, "info"], capture_output=True).returncode != 0:
            assert proc.poll() is None, f"pulseaudio exited: {proc.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, "pulseaudio did not come up"
            time.sleep(0.1)
        yield address
    finally:
        reap(proc)


def record_streams(server: str) -> int:
    """How many record streams (source outputs) the server has open."""
    out = subprocess.run(["pactl", "--server", server, "list", "short", "source-outputs"], capture_output=True,
                         text=True, check=True).stdout
    return len([line for line in out.splitlines() if line.strip()])


def test_a_sine_played_by_the_guest_comes_back_from_the_null_sink_monitor(pulse_server, serve_backend,
                                                                         mock_frontend_factory, tmp_path):
    from vhostuser.devices.sound.pulse import PulseHost

    capture = Path(tmp_path) / "monitor.raw"
    with open(capture, "wb") as sink_file:
        parec = subprocess.Popen(["parec", "--server", pulse_server, f"--device={SINK}.monitor", "--raw",
                                  "--format=s16le", f"--rate={RATE}", "--channels=1", "--latency-msec=20"],
                                 stdout=sink_file, stderr=subprocess.PIPE)
        try:
            time.sleep(0.5)  # recording before the first sample plays
            backend = SoundBackend(PulseHost(server=pulse_server, sink=SINK))
            drv = VirtioSndDriver(mock_frontend_factory(serve_backend(backend), FrontendOptions(config_size=12)))
            drv.probe()
            run = PcmRun(drv, 0, Direction.OUTPUT, rate=RATE, channels=1, period_frames=960,  # 20 ms
                         periods=8, source=sine(440, RATE, amplitude=10000))
            run.start()
            run.pump(50)  # one second
            run.stop()
            assert set(run.status.values()) == {0x8000} and all(c.status == 0x8000 for c in run.completed)
            time.sleep(0.5)
        finally:
            parec.terminate()
            parec.wait(10)
    data = capture.read_bytes()
    s = samples(data)
    loud = [i for i, v in enumerate(s) if abs(v) > 2000]
    assert loud, f"only silence came back ({len(s)} samples)"
    # the middle of the tone: away from its start and end
    middle = s[loud[0] + RATE // 10: loud[-1] - RATE // 10].tobytes()
    assert len(middle) >= RATE  # at least half a second of it
    # a loaded machine may feed the server late (it then inserts silence): judge the tone itself
    assert abs(median_frequency(middle, RATE) - 440) < 3
    assert abs(median_block_rms(middle) - 10000 / 2 ** 0.5) < 0.1 * 10000 / 2 ** 0.5


def test_capture_from_the_monitor_and_switching_the_input_off(pulse_server, serve_backend, mock_frontend_factory,
                                                              tmp_path):
    """pacat plays a 1 kHz tone into the null sink; the guest records the sink's monitor through
    the device; after ``SET input off`` every sample the guest gets is zero."""
    from vhostuser.devices.sound.pulse import PulseHost

    tone = Path(tmp_path) / "tone.raw"
    tone.write_bytes(sine(1000, RATE, amplitude=8000)(RATE * 2 * 6))  # 6 s, mono S16
    pacat = subprocess.Popen(["pacat", "--server", pulse_server, f"--device={SINK}", "--raw", "--format=s16le",
                              f"--rate={RATE}", "--channels=1", str(tone)], stderr=subprocess.PIPE)
    try:
        backend = SoundBackend(PulseHost(server=pulse_server, source=f"{SINK}.monitor"))
        drv = VirtioSndDriver(mock_frontend_factory(serve_backend(backend), FrontendOptions(config_size=12)))
        drv.probe()
        run = PcmRun(drv, 1, Direction.INPUT, rate=RATE, channels=1, period_frames=960)
        run.start()
        for _ in range(150):  # until pacat's tone arrives (pacat may start late on a loaded machine)
            if rms(run.pump(1)[0].frames) > 3000:
                break
        heard = b"".join(c.frames for c in run.pump(20))
        assert abs(median_frequency(heard, RATE) - 1000) < 5 and median_block_rms(heard) > 3000
        assert backend.command("SET input off") == "OK output=on input=off"
        run.collect()  # completed before the switch (the device completes under the lock SET takes)
        after = run.pump(10)
        assert all(c.frames == bytes(len(c.frames)) for c in after)
        # the record stream is closed on the server while the input is disabled
        assert record_streams(pulse_server) == 0
        assert backend.command("SET input on") == "OK output=on input=on"
        assert record_streams(pulse_server) == 1
        run.stop()
    finally:
        reap(pacat)
