"""README's main job keeps working: the quick start runs end to end (short mode)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_runs():
    env = dict(os.environ, QUICK="1")
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py")],
                         check=False, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "C2ST amortized vs NUTS" in out.stdout
    assert "sigma" in out.stdout and "faster" in out.stdout
