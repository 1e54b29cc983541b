"""Sphinx configuration of the vhostuser documentation site.

Build it with ``scripts/docs`` (HTML into ``build/docs/html``; warnings are
errors).  The pages are the Markdown files of ``docs/`` (read by MyST) plus the
API reference in ``docs/api/``, generated from the docstrings by autodoc.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

import vhostuser  # noqa: E402

project = "vhostuser"
author = "the vhostuser authors"
copyright = "the vhostuser authors"  # noqa: A001
release = version = vhostuser.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "build", "api/_*"]

# MyST: ``{eval-rst}`` blocks, heading anchors for the manuals' cross-links,
# and links to our own source files become links into the repository tree.
myst_enable_extensions = ["colon_fence"]
myst_heading_anchors = 3

autodoc_default_options = {
    "members": True,
    "show-inheritance": True,
}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
# the C extension is optional at documentation time: its pure-Python twin documents the API
autodoc_mock_imports: list[str] = []

html_theme = "alabaster"
html_title = f"vhostuser {release}"
html_static_path: list[str] = []

# man pages are generated from the argparse parsers (scripts/manpages), not by Sphinx
nitpicky = False

#: Markdown files outside docs/ that the site shows as a page of its own: a link
#: to one of them (from a page, or from README.md included in the index) becomes
#: a link to that page.
_PAGES_FOR_FILES = {ROOT / "benchmarks" / "README.md": ROOT / "docs" / "benchmarks.md"}
_LINK = re.compile(r"\]\(([^)\s#]+)(#[^)\s]*)?\)")


def _rewrite_links(text: str, base: Path, doc_dir: Path) -> str:
    """Links relative to ``base`` that point at a file of :data:`_PAGES_FOR_FILES`
    become links (relative to ``doc_dir``) to its page."""
    def repl(m: re.Match[str]) -> str:
        target = (base / m.group(1)).resolve()
        page = _PAGES_FOR_FILES.get(target)
        if page is None:
            return m.group(0)
        rel = os.path.relpath(page, doc_dir)
        return f"]({rel if rel.startswith('.') else './' + rel}{m.group(2) or ''})"
    return _LINK.sub(repl, text)


def _rewrite_included_links(app, relative_path, parent_docname, content) -> None:  # noqa: ANN001
    # an included file's links are relative to the file (README.md: the repository root)
    # (MyST's :relative-docs: then maps them onto the including page)
    included = Path(app.srcdir) / relative_path
    content[0] = _rewrite_links(content[0], included.parent, included.parent)


def _rewrite_page_links(app, docname, source) -> None:  # noqa: ANN001
    doc_dir = (Path(app.srcdir) / docname).parent
    source[0] = _rewrite_links(source[0], doc_dir, doc_dir)


def _write_devices_api() -> None:
    """``api/_devices.rst.inc``: an automodule per bundled device, found in the
    package, so a device added later is in the API reference without editing a page."""
    import pkgutil

    import vhostuser.devices

    lines = []
    for info in sorted(pkgutil.iter_modules(vhostuser.devices.__path__), key=lambda i: i.name):
        name = f"vhostuser.devices.{info.name}"
        lines += [f".. automodule:: {name}", "   :members:"]
        if info.ispkg:
            lines.append("   :imported-members:")
        lines.append("")
    out = Path(__file__).resolve().parent / "api" / "_devices.rst.inc"
    text = "\n".join(lines)
    if not out.exists() or out.read_text() != text:
        out.write_text(text)


def setup(app):  # noqa: ANN001, ANN201
    _write_devices_api()
    app.connect("include-read", _rewrite_included_links)
    app.connect("source-read", _rewrite_page_links)


# The same short type name exists in several modules (VringState is the daemon's
# vring and a protocol payload): an ambiguous type hint still links to one of
# them, so that one warning class is not an error.  Every other warning is.
suppress_warnings = ["ref.python"]
