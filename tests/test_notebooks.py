"""The notebooks in examples/notebooks run top to bottom (short mode) and are stored clean."""

import os
from pathlib import Path

import nbclient
import nbformat
import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.slow  # subprocesses: the second test command

NOTEBOOKS = sorted((Path(__file__).parents[1] / "examples" / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 2


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(path):
    book = nbformat.read(path, as_version=4)
    for cell in book.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, path.name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, monkeypatch, tmp_path):
    monkeypatch.setenv("NUMPYRO_AMORTIZED_QUICK", "1")
    if "ruggedness" in path.stem:
        # the user's CSV path (the simulated-data path runs in the full-length docs build):
        # the tutorial's columns, its Latin-1 encoding, and a country without GDP to drop
        rng = np.random.default_rng(0)
        frame = pd.DataFrame({"country": ["Côte d'Ivoire"] + [f"c{i}" for i in range(119)],
                              "cont_africa": rng.integers(0, 2, 120),
                              "rugged": rng.exponential(1.25, 120),
                              "rgdppc_2000": np.exp(rng.normal(8.5, 1.0, 120))})
        frame.loc[3, "rgdppc_2000"] = np.nan
        csv = tmp_path / "rugged_data.csv"
        frame.to_csv(csv, index=False, encoding="ISO-8859-1")
        monkeypatch.setenv("RUGGED_CSV", str(csv))
    book = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(book, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    outputs = [o for c in book.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    figures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert figures, f"{path.name} shows no figure"
    assert os.environ.get("NUMPYRO_AMORTIZED_QUICK") == "1"
    if "ruggedness" in path.stem:
        text = "".join(o.get("text", "") for o in outputs)
        assert f"data: {os.environ['RUGGED_CSV']}, 119 countries" in text
