"""The conformance checker (``vhostuser check``) against our back-ends and
against qemu-storage-daemon's vhost-user-blk export."""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.qsd import qsd_binary, qsd_blk

from vhostuser.cli import main as cli_main
from vhostuser.devices.rng import RngBackend
from vhostuser.testing import EchoBackend
from vhostuser.testing.checker import CHECKS, conforms, format_report, run_checks

ALL = {name for name, _, _ in CHECKS}
ONE_SESSION = Path(__file__).resolve().parent / "helpers" / "one_session_backend.py"


def statuses(results) -> dict[str, str]:
    return {r.name: r.status for r in results}


def test_checker_passes_against_our_rng(no_fd_leak, serve_backend) -> None:
    path = serve_backend(RngBackend())
    results = run_checks(path, device="rng", timeout=5)
    report = format_report(results)
    assert all(r.status == "pass" for r in results), report
    assert {r.name for r in results} == (ALL - {"device"}) | {"device-rng"}
    assert report.endswith("CONFORMS")


def test_checker_passes_against_our_blk(no_fd_leak, serve_backend, tmp_path: Path) -> None:
    """Every check, the blk data path included (a sector written through the ring
    is read back), and every malformed request refused - where qemu-storage-daemon
    fails three (see test_checker_against_qsd)."""
    from vhostuser.devices.blk.device import BlkBackend

    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    path = serve_backend(BlkBackend(str(image)))
    results = run_checks(path, device="blk", timeout=5)
    report = format_report(results)
    assert all(r.status == "pass" for r in results), report
    assert "device-blk" in {r.name for r in results}


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_checker_passes_against_echo(serve_backend, packed: bool) -> None:
    from vhostuser.testing import FrontendOptions

    path = serve_backend(EchoBackend(2))
    opts = FrontendOptions(queue_size=32, packed=packed, memory=((0, 2 << 20), (4 << 20, 2 << 20)),
                           data_size=128 << 10)
    results = run_checks(path, device="echo", options=opts, timeout=5)
    assert all(r.status == "pass" for r in results), format_report(results)


def test_checker_without_device_skips_the_device_check(serve_backend) -> None:
    path = serve_backend(EchoBackend(1))
    results = run_checks(path, timeout=5)
    assert statuses(results)["device"] == "skip"
    assert all(r.ok for r in results), format_report(results)


def test_checker_fails_on_a_dead_socket(vhost_socket_dir) -> None:
    results = run_checks(os.path.join(vhost_socket_dir, "nobody.sock"), timeout=0.2)
    assert [(r.name, r.status) for r in results] == [("handshake", "fail")]
    assert not results[0].ok


def test_cli_check_exec_json(capsys) -> None:
    cmd = f"{sys.executable} -m vhostuser.testing.echo --socket-path {{socket}} --queues 2"
    rc = cli_main(["check", "--exec", cmd, "--device", "echo", "--json", "--timeout", "5"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0, out
    assert out["ok"] is True
    assert {c["name"] for c in out["checks"]} == (ALL - {"device"}) | {"device-echo"}


def test_cli_check_text_report_and_exit_status(serve_backend, capsys) -> None:
    path = serve_backend(EchoBackend(1))
    assert cli_main(["check", "--socket-path", path, "--only", "handshake,malformed-version"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("PASS  handshake")
    assert out[1].startswith("PASS  malformed-version")
    assert out[-1] == "2 passed, 0 failed, 0 warnings, 0 skipped: CONFORMS"


def test_only_gathers_the_facts_its_checks_need(serve_backend, capsys) -> None:
    """--only reply-ack runs the handshake first (unreported) so it knows REPLY_ACK is offered."""
    path = serve_backend(EchoBackend(1))
    results = run_checks(path, only=["reply-ack"], timeout=5)
    assert [(r.name, r.status) for r in results] == [("reply-ack", "pass")], format_report(results)
    assert cli_main(["check", "--socket-path", path, "--only", "reply-ack"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "1 passed, 0 failed, 0 warnings, 0 skipped: CONFORMS"


def test_nothing_passed_is_never_conforms(serve_backend, capsys) -> None:
    path = serve_backend(EchoBackend(1))
    results = run_checks(path, only=["device"], timeout=5)  # no --device: the one check skips
    assert [r.status for r in results] == ["skip"]
    assert not conforms(results)
    assert format_report(results).endswith("NOTHING CHECKED (no check passed)")
    assert cli_main(["check", "--socket-path", path, "--only", "device"]) == 1


def test_unknown_only_name_is_a_usage_error(serve_backend, capsys) -> None:
    path = serve_backend(EchoBackend(1))
    assert cli_main(["check", "--socket-path", path, "--only", "reply_ack"]) == 2
    assert "unknown check reply_ack" in capsys.readouterr().err


def test_a_backend_that_exits_is_reported_and_the_rest_not_run(capsys) -> None:
    """Like virtiofsd: one session, then the process exits (status 3)."""
    cmd = f"{sys.executable} {ONE_SESSION} {{socket}}"
    assert cli_main(["check", "--exec", cmd, "--timeout", "3"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("PASS  handshake"), out
    # the check after the session fails because the process had gone (or, if its exit was
    # seen first, is not run); every later one is not run; the verdict is not a verdict
    assert all("back-end exited (status 3)" in line for line in out[1:-1]), out
    assert all(line.startswith("----") for line in out[2:-1]), out
    assert out[-1].endswith("12 not run: INCOMPLETE (the back-end exited)") \
        or out[-1].endswith("11 not run: INCOMPLETE (the back-end exited)"), \
        out[-1]
    assert "ConnectionRefusedError" not in "\n".join(out[2:])


def test_restart_per_check_serves_every_check_with_a_fresh_backend(capsys) -> None:
    cmd = f"{sys.executable} {ONE_SESSION} {{socket}}"
    rc = cli_main(["check", "--exec", cmd, "--restart-per-check", "--timeout", "3", "--json",
                   "--only", "handshake,features,reply-ack,rings,vring-base,memory-table"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0, out
    assert [c["status"] for c in out["checks"]] == ["pass"] * 6


def test_restart_per_check_needs_exec(serve_backend, capsys) -> None:
    path = serve_backend(EchoBackend(1))
    assert cli_main(["check", "--socket-path", path, "--restart-per-check"]) == 2


def test_cli_check_exec_failure(capsys) -> None:
    rc = cli_main(["check", "--exec", "false {socket}", "--timeout", "1"])
    assert rc == 2
    assert "exited with status 1" in capsys.readouterr().err


# ------------------------------------------------------------------- qsd
@pytest.fixture
def qsd_blk_socket() -> Iterator[str]:
    """qemu-storage-daemon exporting a 64 MiB image over vhost-user-blk; yields the socket path."""
    with qsd_blk(64 << 20) as (sock, _image):
        yield str(sock)


@pytest.mark.qsd
def test_checker_against_qsd(qsd_blk_socket: str) -> None:
    results = run_checks(qsd_blk_socket, device="blk", timeout=5)
    got = statuses(results)
    report = format_report(results)
    # everything a working front-end needs passes, the blk data path included
    for name in ("handshake", "features", "reply-ack", "rings", "vring-base", "reconnect", "memory-table",
                 "device-blk"):
        assert got[name] == "pass", report
    # libvhost-user answers NEED_REPLY with 0 even for requests it rejected (vu_panic),
    # then drops the connection for some of them; it still accepts the next connection
    for name in ("malformed-unknown-request", "malformed-payload-size", "malformed-missing-fd"):
        assert got[name] == "fail", report
        detail = next(r.detail for r in results if r.name == name)
        assert detail.startswith("acked (0)") and detail.endswith("new connection accepted"), detail
    # it ignores the version bits (optional check: a warning)
    assert got["malformed-version"] == "fail" and not next(r for r in results if r.name == "malformed-version").required
    # an out-of-range vring index is acked with 0 and the connection carries on
    # (optional check: a warning); qsd keeps serving
    assert got["malformed-vring-index"] == "fail"
    detail = next(r.detail for r in results if r.name == "malformed-vring-index")
    assert detail.startswith("acked (0)") and detail.endswith("new connection accepted"), detail


@pytest.mark.qsd
def test_cli_check_exec_qsd(tmp_path: Path, capsys) -> None:
    binary = qsd_binary()
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    cmd = (f"{binary} --blockdev driver=file,node-name=f,filename={image} --export "
           "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={socket},writable=on")
    rc = cli_main(["check", "--exec", cmd, "--device", "blk", "--only", "handshake,rings,device-blk", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0, out
    assert [c["status"] for c in out["checks"]] == ["pass", "pass", "pass"]
