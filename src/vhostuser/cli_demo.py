"""``vhostuser demo``: a bundled back-end driven end to end, narrated.

It starts the virtio-rng back-end as its own program (``vhostuser rng``), then
plays QEMU's part with the library's mock front-end: the vhost-user handshake,
guest RAM shared by fd, a virtqueue, buffers placed and kicked, used buffers
reaped, the ring stopped with GET_VRING_BASE, a disconnect and a reconnect.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DESCRIPTION = """Run the bundled virtio-rng back-end in its own process and drive it end to end
with the library's front-end, the way QEMU does, printing each step."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--requests", type=int, default=4, metavar="N", help="buffers to send (default: 4)")
    parser.add_argument("--bytes", type=int, default=16, metavar="N", help="bytes per buffer (default: 16)")
    parser.add_argument("--packed", action="store_true", help="use a packed virtqueue instead of a split one")
    parser.add_argument("--rng-source", default="/dev/urandom", metavar="PATH",
                        help="the back-end's entropy source (default: /dev/urandom)")


def _say(step: str, text: str) -> None:
    print(f"[{step:>9}] {text}", flush=True)


def _wait_for_socket(path: Path, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"the back-end exited with status {proc.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the back-end did not create {path} within {timeout}s")
        time.sleep(0.02)


def run(args: argparse.Namespace) -> int:
    import vhostuser
    from vhostuser.protocol.message import VirtioFeatures as VF
    from vhostuser.testing.frontend import FrontendOptions, MockFrontend

    if args.requests < 1 or args.bytes < 1:
        print("vhostuser demo: --requests and --bytes must be positive", file=sys.stderr)
        return 2
    _say("library", f"vhostuser {vhostuser.__version__}, data path: {vhostuser.IMPL}")
    with tempfile.TemporaryDirectory(prefix="vhostuser-demo-") as tmp:
        sock = Path(tmp) / "rng.sock"
        cmd = [sys.executable, "-m", "vhostuser", "rng", "--socket-path", str(sock), "--rng-source", args.rng_source]
        backend = subprocess.Popen(cmd)
        try:
            _wait_for_socket(sock, backend)
            _say("back-end", f"pid {backend.pid}: vhostuser rng --socket-path {sock}")
            options = FrontendOptions(packed=args.packed, queue_size=8)
            with MockFrontend.connect(str(sock), options) as fe:
                names = [f.name for f in VF if f.name and fe.acked_features & f]
                _say("handshake", f"back-end offers features {fe.offered_features:#x}; acked {', '.join(names)}")
                _say("handshake", f"protocol features: {fe.protocol_features!r}")
                ring = "packed" if fe.packed else "split"
                _say("memory", f"guest RAM shared by fd: {len(options.memory)} regions "
                               f"({', '.join(f'{size >> 20} MiB at {gpa:#x}' for gpa, size in options.memory)})")
                _say("rings", f"queue 0: {ring} ring of {options.queue_size} entries, kick/call/err eventfds, enabled")
                total = 0
                for i in range(args.requests):
                    used = fe.request(0, writable=[args.bytes])
                    total += used.length
                    _say("request", f"#{i}: {used.length} random bytes: {used.data.hex()}")
                bases = fe.stop()
                _say("stop", f"GET_VRING_BASE: queue 0 stopped at {bases[0]:#x}")
                fe.reconnect()
                used = fe.request(0, writable=[args.bytes])
                _say("reconnect", f"a new connection to the same back-end; another {used.length} bytes: "
                                  f"{used.data.hex()}")
                total += used.length
            _say("done", f"{total} bytes of entropy read through a virtqueue from the back-end process")
        finally:
            backend.send_signal(signal.SIGTERM)
            try:
                rc = backend.wait(timeout=10)
            except subprocess.TimeoutExpired:
                backend.kill()
                rc = backend.wait()
            _say("back-end", f"SIGTERM: exited with status {rc}; socket removed: {not sock.exists()}")
    return 0 if rc == 0 else 1


if __name__ == "__main__":  # pragma: no cover
    os.execv(sys.executable, [sys.executable, "-m", "vhostuser", "demo", *sys.argv[1:]])
