"""The documentation site builds with warnings as errors, with the API pages and notebooks."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_docs_build_without_warnings(tmp_path):
    # the notebooks are rendered without running them here: test_notebooks runs them
    env = dict(os.environ, NUMPYRO_AMORTIZED_DOCS_EXECUTE="off")
    out = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
         str(ROOT / "docs"), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-5000:]
    api = (tmp_path / "api" / "guide.html").read_text()
    assert "sample_posterior_batch" in api and "AutoAmortizedFlow" in api
    assert "compare_with_nuts" in (tmp_path / "api" / "compare.html").read_text()
    for book in sorted((ROOT / "examples" / "notebooks").glob("*.ipynb")):
        assert (tmp_path / "notebooks" / f"{book.stem}.html").exists(), book.name
    for page in ("getting_started", "concepts", "benchmarks", "scaling"):
        assert (tmp_path / f"{page}.html").exists(), page
