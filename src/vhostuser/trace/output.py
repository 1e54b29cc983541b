"""How trace events are written: readable text (default) or JSON Lines (``--json``)."""
from __future__ import annotations

import json
import sys
import threading
from typing import Any, TextIO

from .events import TraceEvent

__all__ = ["TextWriter", "JsonWriter", "format_event", "format_summary", "read_json_lines"]

_SKIP_PAYLOAD = {"padding"}


def _value(v: Any) -> str:
    if isinstance(v, int) and not isinstance(v, bool) and v > 9:
        return hex(v)
    if isinstance(v, dict):
        return "{" + " ".join(f"{k}={_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, str) and len(v) > 64:
        return v[:64] + "..."
    return str(v)


def format_event(ev: TraceEvent) -> str:
    """One readable line (a few for a summary)."""
    head = f"{ev.t:10.4f} " + (f"[s{ev.session}] " if ev.session is not None else "")
    if ev.kind == "summary":
        return head + "summary\n" + format_summary(ev.data or {})
    if ev.kind == "finding":
        return (head + f"!! {ev.severity.upper() if ev.severity else ''} {ev.who}: {ev.text} "
                f"[rule {ev.rule}, {ev.section}]" + (f" (#{ev.about})" if ev.about else ""))
    if ev.kind in ("request", "reply"):
        chan = "" if ev.channel == "main" else f"({ev.channel}) "
        parts = [head + f"#{ev.seq} {ev.dir} {chan}{ev.kind:7} {ev.request}"]
        flags = ",".join(ev.flag_names or [])
        parts.append(f"flags={ev.flags:#x}{'(' + flags + ')' if flags else ''} size={ev.size}")
        if ev.payload:
            parts.append(" ".join(f"{k}={_value(v)}" for k, v in ev.payload.items() if k not in _SKIP_PAYLOAD))
        if ev.decoded:
            parts.append(" ".join("[" + "|".join(names) + "]" for names in ev.decoded.values()))
        if ev.fds:
            parts.append("fds=" + ",".join(f"{f['kind']}" + (f":{f['size']:#x}" if "size" in f else "")
                                           for f in ev.fds))
        if ev.reply_to is not None:
            parts.append(f"<- #{ev.reply_to} in {ev.latency_ms} ms")
        if ev.nack:
            parts.append("NACK")
        if ev.error:
            parts.append(f"UNDECODABLE: {ev.error}")
        return " ".join(parts)
    where = " ".join(x for x in (ev.channel if ev.channel not in (None, "main") else None, ev.dir) if x)
    return head + f"{ev.kind} " + (f"{where} " if where else "") + (ev.text or "")


def format_summary(d: dict[str, Any]) -> str:
    """The end-of-session summary as indented text."""
    lines = []
    for key in ("features_offered", "features_acked"):
        if key in d:
            lines.append(f"  {key.replace('_', ' ')}: {d[key]} [{'|'.join(d[key + '_names'])}]")
    for key in ("protocol_offered", "protocol_acked"):
        if key in d:
            lines.append(f"  {key.replace('_', ' ')}: [{'|'.join(d[key])}]")
    if "queue_num" in d:
        lines.append(f"  queue num: {d['queue_num']}")
    for r in d.get("regions", []):
        lines.append(f"  region gpa={r['gpa']} size={r['size']} uva={r['uva']} offset={r['offset']} fd={r['fd']}")
    for r in d.get("rings", []):
        lines.append("  ring " + " ".join(f"{k}={v}" for k, v in r.items()))
    counts = d.get("counts", {})
    lines.append("  requests: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    lines.append(f"  nacks: {', '.join(d.get('nacks', [])) or 'none'}; undecodable: {len(d.get('errors', []))}; "
                 f"findings: {d.get('findings', 0)}; back-end channel: {'yes' if d.get('backend_channel') else 'no'}")
    if "first_ring_start_s" in d:
        lines.append(f"  first ring start: {d['first_ring_start_s'] * 1000:.1f} ms after connect")
    if "duration_s" in d:
        lines.append(f"  session length: {d['duration_s']:.3f} s")
    return "\n".join(lines)


class TextWriter:
    """A sink writing readable lines to a stream (thread-safe)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self._lock = threading.Lock()

    def __call__(self, ev: TraceEvent) -> None:
        with self._lock:
            self.stream.write(format_event(ev) + "\n")
            self.stream.flush()


class JsonWriter:
    """A sink writing one JSON object per line (thread-safe)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self._lock = threading.Lock()

    def __call__(self, ev: TraceEvent) -> None:
        with self._lock:
            self.stream.write(ev.to_json() + "\n")
            self.stream.flush()


def read_json_lines(text: str) -> list[TraceEvent]:
    """Parse ``--json`` output back into events."""
    return [TraceEvent.from_dict(json.loads(line)) for line in text.splitlines() if line.strip()]
