"""Sphinx configuration: myst-nb for Markdown pages and the notebooks, autodoc for the API.

Build (warnings are errors, as in CI)::

    python -m pip install -e ".[docs]"
    python -m sphinx -W --keep-going -b html docs docs/_build/html

The notebooks of ``examples/notebooks`` are copied into ``docs/notebooks`` (not kept in git)
and executed during the build, full length, so the pages show trained guides.
``NUMPYRO_AMORTIZED_DOCS_EXECUTE=off`` renders them without running them (the test suite does
this: it runs the notebooks itself, in short mode).
"""

import os
import shutil
from pathlib import Path

import numpyro_amortized

HERE = Path(__file__).parent
shutil.rmtree(HERE / "notebooks", ignore_errors=True)
shutil.copytree(HERE.parent / "examples" / "notebooks", HERE / "notebooks")

project = "numpyro_amortized"
author = "the numpyro_amortized developers"
copyright = "2026, " + author
release = version = numpyro_amortized.__version__

extensions = ["myst_nb", "sphinx.ext.autodoc", "sphinx.ext.viewcode", "sphinx.ext.mathjax"]
exclude_patterns = ["_build", "**.ipynb_checkpoints", "notebooks/README.md", "dev"]
myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3

nb_execution_mode = os.environ.get("NUMPYRO_AMORTIZED_DOCS_EXECUTE", "force")
nb_execution_timeout = 3600
nb_execution_raise_on_error = True

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": False}

html_theme = "alabaster"
html_title = "numpyro_amortized"
