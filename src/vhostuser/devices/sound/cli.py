"""``vhostuser sound``: the virtio-snd command."""
from __future__ import annotations

import argparse
from typing import Any

from ..common import add_backend_arguments, capabilities, serve_backends
from .device import SoundBackend
from .hosts import make_host

#: ``--print-capabilities``
CAPABILITIES: dict[str, Any] = capabilities("sound")

DESCRIPTION = """virtio-sound vhost-user back-end (device id 25).

Always one output stream (id 0) and one input stream (id 1), each with an
enable flag checked where the samples move: a disabled output is discarded (the
guest still gets its buffers back on time), a disabled input is silence.

  vhostuser sound -s /tmp/snd.sock --backend pulse --initial-streams output \\
      --control-socket /tmp/snd.ctl
  echo 'SET input on' | socat - UNIX-CONNECT:/tmp/snd.ctl     # -> OK output=on input=on

Control socket (mode 0600, several clients), one line each way:
  QUERY                       -> OK output=on|off input=on|off
  SET output|input on|off     -> OK output=... input=...   (bad commands: ERROR ..., nothing changes)

Back-ends: null; file (--output-file OUT.wav, --input-file IN.wav);
pulse (PulseAudio or pipewire-pulse through libpulse-simple).

QEMU 7.2 has no vhost-user sound front-end; QEMU 9.0+:
  -chardev socket,id=snd0,path=/tmp/snd.sock -device vhost-user-snd-pci,chardev=snd0"""


def _streams(text: str) -> set[str]:
    names = {n.strip() for n in text.lower().split(",") if n.strip()}
    if names == {"none"}:
        return set()
    if not names <= {"output", "input"}:
        raise argparse.ArgumentTypeError(f"--initial-streams {text!r}: a list of output, input (or none)")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``vhostuser sound`` options: the back-end conventions' flags plus the host audio back-end."""
    add_backend_arguments(parser, socket_count=False)
    parser.add_argument("-b", "--backend", choices=("null", "file", "pulse"), default="null",
                        help="host audio back-end (default: null)")
    parser.add_argument("--initial-streams", type=_streams, default={"output", "input"}, metavar="LIST",
                        help="directions enabled at start: output,input (default), output, input or none")
    parser.add_argument("--control-socket", metavar="PATH",
                        help="UNIX socket (0600) to query and switch the directions at run time")
    parser.add_argument("--output-file", metavar="WAV", help="file back-end: write the output here")
    parser.add_argument("--input-file", metavar="WAV", help="file back-end: read the input from here")
    parser.add_argument("--pulse-server", metavar="SERVER", help="pulse back-end: server (default: environment)")
    parser.add_argument("--pulse-sink", metavar="NAME", help="pulse back-end: sink to play to (default sink)")
    parser.add_argument("--pulse-source", metavar="NAME",
                        help="pulse back-end: source to record from (default source)")


def build_backend(args: argparse.Namespace) -> SoundBackend:
    """The back-end the arguments describe, with its control socket if asked for."""
    host = make_host(args.backend, output_file=args.output_file, input_file=args.input_file,
                     pulse_server=args.pulse_server, pulse_sink=args.pulse_sink, pulse_source=args.pulse_source)
    backend = SoundBackend(host, output_enabled="output" in args.initial_streams,
                           input_enabled="input" in args.initial_streams)
    if args.control_socket:
        from ..control_socket import attach_control_socket

        attach_control_socket(backend, args.control_socket, backend.command, name="sound-control")
    return backend


def run(args: argparse.Namespace) -> int:
    """Serve ``vhostuser sound`` as parsed into ``args`` until SIGTERM/SIGINT; the exit status."""
    return serve_backends("sound", args, lambda i: build_backend(args), CAPABILITIES)
