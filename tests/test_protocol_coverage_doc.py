"""docs/protocol.md's "What the daemon does" table is generated from the code:
this test fails (and prints the table to paste) when they drift apart."""
from __future__ import annotations

from pathlib import Path

from vhostuser.backend_handler import DAEMON_PROTOCOL_FEATURES, VhostUserHandler
from vhostuser.handler import BackendReqHandler
from vhostuser.protocol.message import FrontendReq
from vhostuser.protocol.requests import FRONTEND_REQUESTS

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
BEGIN, END = "<!-- daemon-table-begin -->", "<!-- daemon-table-end -->"

#: what a device has to do for the daemon to offer a gated request
DEVICE_OPT_IN = {
    "CONFIG": "`config_space` (or `get_config`)",
    "DEVICE_STATE": "`supports_device_state` + `save_state`/`load_state`",
    "INFLIGHT_SHMFD": "`supports_inflight`",
    "SHARED_OBJECT": "`protocol_features()` + `get_shared_object`",
    "RARP": "`protocol_features()` + `send_rarp` (net)",
    "MTU": "`protocol_features()` + `net_set_mtu` (net)",
}


def daemon_table() -> str:
    rows = ["| # | request | gate | the daemon | device opt-in |", "|---|---|---|---|---|"]
    seen = set()
    for req in FrontendReq:
        if req.value in seen:
            continue  # aliases (SET_SLAVE_REQ_FD)
        seen.add(req.value)
        spec = FRONTEND_REQUESTS[req]
        method = req.name.lower()
        ours = getattr(VhostUserHandler, method, None)
        base = getattr(BackendReqHandler, method, None)
        implemented = ours is not None and ours is not base
        gate = spec.feature.name if spec.feature is not None else "—"
        opt_in = "—"
        if spec.feature is not None and not spec.feature & DAEMON_PROTOCOL_FEATURES:
            opt_in = DEVICE_OPT_IN.get(spec.feature.name, "not offered")
        rows.append(f"| {req.value} | `{req.name}` | {gate} | {'yes' if implemented else 'rejected'} | {opt_in} |")
    return "\n".join(rows)


def test_daemon_table_in_the_docs_matches_the_code() -> None:
    text = DOC.read_text()
    assert BEGIN in text and END in text, f"docs/protocol.md needs {BEGIN} ... {END}"
    current = text.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert current == daemon_table(), "regenerate the table:\n" + daemon_table()


if __name__ == "__main__":
    print(daemon_table())
