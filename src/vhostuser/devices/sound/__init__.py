"""virtio-snd vhost-user back-end (VIRTIO 1.3 §5.14, device id 25).

* :mod:`.protocol` - wire formats, codes and the PCM state machine (sans-IO);
* :mod:`.device` - :class:`SoundBackend`: control/event queues, paced tx/rx, enable flags;
* :mod:`.hosts` - host audio back-ends ``null`` and ``file`` (WAV);
* :mod:`.pulse` - the ``pulse`` back-end (cffi binding to libpulse-simple);
* :mod:`.cli` - the ``vhostuser sound`` command.
"""
from __future__ import annotations

from .cli import DESCRIPTION, add_arguments, run
from .device import INPUT_STREAM, OUTPUT_STREAM, SoundBackend
from .hosts import FileHost, NullHost, make_host
from .protocol import VIRTIO_ID_SOUND, Code, Direction, Format, PcmState

__all__ = ["DESCRIPTION", "add_arguments", "run", "SoundBackend", "OUTPUT_STREAM", "INPUT_STREAM", "FileHost",
           "NullHost", "make_host", "VIRTIO_ID_SOUND", "Code", "Direction", "Format", "PcmState"]
