"""Man pages for the commands, generated from their argparse parsers.

``python -m vhostuser.manpages DIR`` writes ``vhostuser.1`` and one
``vhostuser-NAME.1`` per subcommand (``vhostuser rng`` ...) into ``DIR``, in
roff (``man -l DIR/vhostuser-rng.1`` shows one).  The text comes from the same
parsers ``--help`` prints, so the pages cannot drift from the commands.
``scripts/docs`` builds them into ``build/docs/man``.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__

__all__ = ["manpage", "manpages", "write_manpages", "main"]


def _roff(text: str) -> str:
    """Escape text for roff: backslashes, and a leading dot or quote on a line."""
    out = []
    for line in text.replace("\\", "\\e").split("\n"):
        if line.startswith((".", "'")):
            line = "\\&" + line
        out.append(line)
    return "\n".join(out)


def _invocation(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"\\fI{action.metavar or action.dest}\\fR"
    flags = ", ".join(f"\\fB{_roff(s)}\\fR" for s in action.option_strings)
    if action.nargs == 0:
        return flags
    metavar = action.metavar or (action.dest.upper() if action.choices is None
                                 else "{" + ",".join(map(str, action.choices)) + "}")
    return f"{flags} \\fI{_roff(str(metavar))}\\fR"


def _description_paragraphs(text: str) -> list[str]:
    """Paragraphs of a description; indented blocks (examples) stay verbatim."""
    lines = []
    for para in text.strip().split("\n\n"):
        if any(line.startswith("  ") for line in para.splitlines()):
            lines += [".PP", ".nf", ".RS 4", _roff(para), ".RE", ".fi"]
        else:
            lines += [".PP", _roff(" ".join(para.split()))]
    return lines


def manpage(parser: argparse.ArgumentParser, name: str, summary: str, *, date: str | None = None,
            see_also: Sequence[str] = ()) -> str:
    """One man page (section 1, roff) for ``parser``, titled ``name``.

    Args:
        parser: the command's parser; its usage, description and options make the page.
        name: the page name (``vhostuser-rng``).
        summary: the one-line summary of the NAME section.
        date: the page date (default: today, or ``SOURCE_DATE_EPOCH`` when set).
        see_also: other page names for SEE ALSO.
    """
    if date is None:
        epoch = os.environ.get("SOURCE_DATE_EPOCH")
        when = (datetime.datetime.fromtimestamp(int(epoch), datetime.timezone.utc) if epoch
                else datetime.datetime.now(datetime.timezone.utc))
        date = when.strftime("%Y-%m-%d")
    usage = " ".join(parser.format_usage().split())
    usage = usage.removeprefix("usage: ")
    lines = [
        f'.TH "{name.upper()}" "1" "{date}" "vhostuser {__version__}" "vhostuser manual"',
        ".SH NAME",
        f"{_roff(name)} \\- {_roff(summary)}",
        ".SH SYNOPSIS",
        f".B {_roff(usage)}",
    ]
    if parser.description:
        lines += [".SH DESCRIPTION", *_description_paragraphs(parser.description)]
    actions = [a for a in parser._actions if a.help is not argparse.SUPPRESS]  # noqa: SLF001
    subparsers = [a for a in actions if isinstance(a, argparse._SubParsersAction)]  # noqa: SLF001
    options = [a for a in actions if not isinstance(a, argparse._SubParsersAction)]  # noqa: SLF001
    if options:
        lines.append(".SH OPTIONS")
        for action in options:
            help_text = (action.help or "") % {"default": action.default, "prog": parser.prog}
            lines += [".TP", _invocation(action), _roff(help_text)]
    for sub in subparsers:
        lines.append(".SH COMMANDS")
        for choice in sub._choices_actions:  # noqa: SLF001
            lines += [".TP", f"\\fB{_roff(choice.dest)}\\fR", _roff(choice.help or "")]
    if see_also:
        lines += [".SH SEE ALSO", ", ".join(f"\\fB{_roff(s)}\\fR(1)" for s in see_also)]
    return "\n".join(lines) + "\n"


def manpages() -> dict[str, str]:
    """Every command's page: ``{"vhostuser.1": roff, "vhostuser-rng.1": roff, ...}``."""
    from .cli import SUBCOMMANDS, build_parser

    parser = build_parser()
    sub_action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))  # noqa: SLF001
    names = [f"vhostuser-{name}" for name in SUBCOMMANDS]
    pages = {"vhostuser.1": manpage(parser, "vhostuser", "vhost-user device back-ends and tools", see_also=names)}
    for name, (_module, help_text) in SUBCOMMANDS.items():
        sub = sub_action.choices[name]
        pages[f"vhostuser-{name}.1"] = manpage(sub, f"vhostuser-{name}", help_text, see_also=["vhostuser"])
    return pages


def write_manpages(directory: str | os.PathLike[str]) -> list[Path]:
    """Write :func:`manpages` into ``directory`` (created if missing); the paths written."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for filename, text in manpages().items():
        path = out / filename
        path.write_text(text)
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vhostuser.manpages DIR``."""
    parser = argparse.ArgumentParser(prog="python -m vhostuser.manpages", description=__doc__.split("\n")[0])
    parser.add_argument("directory", help="where to write the pages")
    args = parser.parse_args(argv)
    for path in write_manpages(args.directory):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
