"""Sphinx configuration of the vhostuser documentation site.

Build it with ``scripts/docs`` (HTML into ``build/docs/html``; warnings are
errors).  The pages are the Markdown files of ``docs/`` (read by MyST) plus the
API reference in ``docs/api/``, generated from the docstrings by autodoc.
"""
from __future__ import annotations

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
exclude_patterns = ["_build", "build"]

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

#: links in files included from outside docs/ that point at a page the site has
#: under another name (README.md links benchmarks/README.md; the site has docs/benchmarks.md)
_INCLUDED_LINKS = {"](./benchmarks/README.md)": "](./docs/benchmarks.md)"}


def _rewrite_included_links(app, relative_path, parent_docname, content) -> None:  # noqa: ANN001
    for old, new in _INCLUDED_LINKS.items():
        content[0] = content[0].replace(old, new)


def setup(app):  # noqa: ANN001, ANN201
    app.connect("include-read", _rewrite_included_links)

# The same short type name exists in several modules (VringState is the daemon's
# vring and a protocol payload): an ambiguous type hint still links to one of
# them, so that one warning class is not an error.  Every other warning is.
suppress_warnings = ["ref.python"]
