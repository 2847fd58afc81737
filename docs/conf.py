"""Sphinx configuration: Markdown pages (MyST) plus an API page from docstrings."""

project = "skresflow"
author = "skresflow developers"
extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "numpydoc",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "contents"
exclude_patterns = ["_build"]
nitpicky = False
autosummary_generate = False
numpydoc_show_class_members = False
numpydoc_validation_checks = set()
suppress_warnings = ["myst.header", "myst.xref_missing"]
html_theme = "alabaster"
