"""The documentation site builds with warnings as errors, with the API pages and notebooks;
the order in which the suite runs its tests."""

import json
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


def test_the_longest_recorded_tests_run_first_and_shares_keep_xdists_sizes():
    from types import SimpleNamespace

    from conftest import DURATIONS, worker_shares

    items = [SimpleNamespace(nodeid=f"t{i}") for i in range(9)]
    seconds = {"t2": 50.0, "t7": 300.0, "t4": 100.0, "t5": 120.0}
    order = [i.nodeid for i in worker_shares(items, seconds, 2)]
    # t7 alone outweighs the rest: the first share (4 = 9 // 2 tests) holds it and the first
    # untimed ones; the second share starts with the other timed tests, longest first
    assert order == ["t7", "t0", "t1", "t3", "t5", "t4", "t2", "t6", "t8"]
    assert [i.nodeid for i in worker_shares(items, {}, 2)] == [f"t{i}" for i in range(9)]
    recorded = json.loads(DURATIONS.read_text())
    assert all(v > 0 for v in recorded.values())
    assert all((ROOT / k.split("::")[0]).exists() for k in recorded), recorded
