"""``vhostuser trace``: a relaying proxy that decodes and judges a live vhost-user session.

* :mod:`.proxy` - :class:`TraceProxy`, the relay (front-end socket <-> back-end socket)
* :mod:`.session` - :class:`SessionState`, what is known about one connection, its summary
* :mod:`.rules` - :data:`RULES` and :class:`SpecChecker` (``--check``)
* :mod:`.events` - :class:`TraceEvent`, the JSON Lines schema
* :mod:`.output` - text and JSON writers

See ``docs/tools/trace.md``.
"""
from __future__ import annotations

from .events import TraceEvent
from .output import JsonWriter, TextWriter, format_event, read_json_lines
from .proxy import TraceOptions, TraceProxy
from .rules import RULES, Finding, Rule, SpecChecker
from .session import SessionState

__all__ = ["TraceEvent", "JsonWriter", "TextWriter", "format_event", "read_json_lines", "TraceOptions",
           "TraceProxy", "RULES", "Finding", "Rule", "SpecChecker", "SessionState"]
