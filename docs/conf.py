"""Sphinx configuration: ``sphinx-build -W -b html docs docs/_build/html`` (README: "Documentation")."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "_ext"))
sys.path.insert(0, str(HERE.parent))

import distclip  # noqa: E402

project = "distclip"
author = "distclip developers"
copyright = "2026, distclip developers"
release = distclip.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "distclip_docs",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3
exclude_patterns = ["_build", "README.md"]
html_theme = "furo"
html_title = f"distclip {release}"

# Two integrations import their framework at module level: mocked where it is not installed, so that the
# docs extra alone builds the site (with the frameworks installed, autodoc shows their real signatures).
autodoc_mock_imports = [name for name in ("transformers", "lightning") if importlib.util.find_spec(name) is None]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
nitpicky = False
suppress_warnings = ["myst.xref_missing"]
