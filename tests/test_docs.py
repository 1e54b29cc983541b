"""The docs cannot rot silently: every ``python`` code block of the README and the
device author's guide runs, the man pages come from the parsers, and the docs
stand on their own (no paths a user does not have).

A code block that serves a device (``daemon.serve(...)`` / ``start_server``) runs
as its own process with the socket path replaced by a temporary one; the mock
front-end then brings the device up (handshake, memory, rings) and, when the
block is preceded by ``<!-- docs-test: echo -->``, checks that requests come
back echoed (``produces``: that buffers handed to the device get filled).  Every other block runs in this process.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.procs import reap, wait_for_path

from vhostuser.cli import SUBCOMMANDS, build_parser
from vhostuser.manpages import manpages, write_manpages
from vhostuser.testing.frontend import MockFrontend

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
#: the documents whose python blocks are executed
EXECUTED = [ROOT / "README.md", DOCS / "device-guide.md"]
_BLOCK = re.compile(r"(?:<!-- docs-test: (?P<check>[\w-]+) -->\n)?```python\n(?P<code>.*?)```", re.S)
_SOCKET = re.compile(r'"(/tmp/[\w.-]+\.sock)"')


def code_blocks() -> list[pytest.param]:
    params = []
    for doc in EXECUTED:
        text = doc.read_text()
        for m in _BLOCK.finditer(text):
            line = text.count("\n", 0, m.start("code")) + 1
            params.append(pytest.param(doc, line, m.group("code"), m.group("check"),
                                       id=f"{doc.relative_to(ROOT)}:{line}"))
    return params


def _served(code: str) -> bool:
    return bool(re.search(r"\.(serve|start_server)\(", code))


@pytest.mark.parametrize(("doc", "line", "code", "check"), code_blocks())
def test_code_block_runs(doc: Path, line: int, code: str, check: str | None, tmp_path: Path) -> None:
    if not _served(code):
        namespace: dict = {"__name__": "docs_block"}
        exec(compile(code, f"{doc}:{line}", "exec"), namespace)  # noqa: S102 - our own docs
        return
    sockets = set(_SOCKET.findall(code))
    assert len(sockets) == 1, f"{doc}:{line}: a served block names exactly one /tmp/*.sock path"
    sock = tmp_path / "dev.sock"
    script = tmp_path / "block.py"
    script.write_text(code.replace(sockets.pop(), str(sock)))
    proc = subprocess.Popen([sys.executable, str(script)], stderr=subprocess.PIPE, text=True)
    try:
        wait_for_path(sock, proc)
        with MockFrontend.connect(str(sock)) as fe:
            assert fe.vrings, "no ring was set up"
            if check == "echo":
                got = fe.transfer(0, [([f"line {i}".encode()], [32]) for i in range(50)])
                assert [u.data[: u.length] for u in got] == [f"line {i}".encode() for i in range(50)]
            elif check == "produces":  # data the device makes on its own fills buffers given to it
                for _ in range(4):
                    fe.add(0, writable=[64])
                fe.publish(0)
                got = fe.wait_used(0, 4, timeout=10)
                assert [u.length for u in got] == [8] * 4
            else:
                assert check is None, f"unknown docs-test check {check!r}"
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
    finally:
        reap(proc)


def test_executed_documents_have_code_blocks() -> None:
    """The guard above is live: both documents have blocks, and at least one is served."""
    blocks = code_blocks()
    assert {p.values[0] for p in blocks} == set(EXECUTED)
    assert any(_served(p.values[2]) for p in blocks)


def test_one_documented_way_to_run_a_device() -> None:
    """README and guide run their devices the same way: ``daemon.serve(path)``."""
    served = [p.values[2] for p in code_blocks() if _served(p.values[2])]
    assert served and all(".serve(" in code and ".start_server(" not in code for code in served)
    guide = (DOCS / "device-guide.md").read_text()
    assert "**The way to run a device is `daemon.serve(path)`**" in guide


# ----------------------------------------------------------------- man pages


def test_a_man_page_per_command_with_every_option(tmp_path: Path) -> None:
    pages = manpages()
    assert set(pages) == {"vhostuser.1", *(f"vhostuser-{n}.1" for n in SUBCOMMANDS)}
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in sub.choices.items():
        page = pages[f"vhostuser-{name}.1"]
        assert page.startswith(f'.TH "VHOSTUSER-{name.upper()}" "1"')
        for action in parser._actions:
            for flag in action.option_strings:
                assert flag.replace("-", "\\-") in page.replace("\\e", "\\").replace("-", "\\-"), (name, flag)
    for name in SUBCOMMANDS:
        assert f"\\fB{name}\\fR" in pages["vhostuser.1"]
    written = write_manpages(str(tmp_path))  # a str path is fine
    assert sorted(p.name for p in written) == sorted(pages)


def test_man_pages_render_without_roff_warnings(tmp_path: Path) -> None:
    groff = shutil.which("groff")
    assert groff, "groff is missing: scripts/install-deps --test installs groff-base"
    for path in write_manpages(tmp_path):
        out = subprocess.run([groff, "-man", "-ww", "-z", str(path)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and not out.stderr, (path.name, out.stderr)


# ------------------------------------------------------------ standalone docs

_FOREIGN = re.compile(r"\.\./shared|/work/|shared/reference|qemu72-[\w-]+\.trace|\(issue \d+\)|FACTS\.md|DEVICE-PEERS")


def _doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.rglob("*.md")), *sorted((ROOT / "src").rglob("*.py")),
            *sorted((ROOT / "examples").rglob("*.py"))]


def test_docs_point_only_at_files_a_user_has() -> None:
    bad = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}"
           for p in _doc_files() for n, line in enumerate(p.read_text().splitlines(), 1) if _FOREIGN.search(line)]
    assert not bad, "\n".join(bad)


_LINE_CLAIM = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)[^.]{0,40}?\b(\d+)\s+lines")


def test_line_counts_quoted_in_docs_are_true() -> None:
    """A claim "[file](path) ... N lines" holds within 10 %."""
    claims = 0
    for doc in [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]:
        for m in _LINE_CLAIM.finditer(doc.read_text()):
            target = (doc.parent / m.group(1)).resolve()
            assert target.is_file(), f"{doc.name}: {m.group(0)}"
            actual = len(target.read_text().splitlines())
            quoted = int(m.group(2))
            assert abs(actual - quoted) <= actual * 0.1, f"{doc.name}: {m.group(0)} - it has {actual}"
            claims += 1
    assert claims >= 1


_QEMU_BLOCK = re.compile(r"```\w*\n(?:[^`]*\n)?qemu-system-x86_64 [^`]*?\.\.\.[^`]*```")
_RIG_RUN = re.compile(r"python -m vhostuser\.testing\.guest run ('[^']*') ((?:\\\n|[^\n])*)")


@pytest.mark.parametrize("manual", sorted((DOCS / "devices").glob("*.md")), ids=lambda p: p.name)
def test_manual_qemu_lines_say_how_to_get_a_guest(manual: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A QEMU line with ``...`` is followed by what ``...`` is and a guest-rig command
    that boots a guest with the device; that command's arguments are valid."""
    from vhostuser.testing import guest

    text = manual.read_text()
    if not _QEMU_BLOCK.search(text):
        return  # no QEMU line with an elision (a device QEMU 7.2 has no front-end for)
    assert "`-kernel` and `-initrd`" in text, manual.name
    if "-device vhost-user-" not in text:
        return  # e.g. net (-netdev vhost-user): the rig's Python API is named instead
    m = _RIG_RUN.search(text)
    assert m, f"{manual.name}: no 'python -m vhostuser.testing.guest run' line"
    args = ["run", m.group(1).strip("'"), *m.group(2).replace("\\\n", " ").split()]
    seen = {}

    def fake_run_guest(script, *, devices, modules, timeout):  # noqa: ANN001, ANN202
        seen.update(script=script, devices=devices)
        return guest.GuestResult(output="", status=0, console="", duration=0.0, script_start=0.0)

    monkeypatch.setattr(guest, "run_guest", fake_run_guest)
    assert guest.main(args) == 0
    (dev,) = seen["devices"]
    assert isinstance(dev, guest.VhostUserDevice) and dev.driver.startswith("vhost-user-")
    assert manual.stem in dev.driver
