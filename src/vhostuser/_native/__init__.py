"""The optional C extension (built by cffi from ring.c / ring.h).

Do not import ``_ring`` directly: :mod:`vhostuser._impl` decides once, at
import time, whether the native or the pure-Python implementation is used.
"""
