"""Sphinx configuration for pyro_vae's documentation."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "pyro_vae"
author = "pyro_vae developers"
copyright = "2026, pyro_vae developers"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "undoc-members": False}
nitpicky = False
exclude_patterns = ["_build"]
html_theme = "alabaster"
