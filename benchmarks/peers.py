"""Peers run side by side with the package: a flowjax NPE and sbi's NPE (MAF and NSF).

Each peer runs in a virtual environment of its own under ``benchmarks/.peers/`` (created on the
first run; neither is a dependency of the package), on 10^4 simulations of the same simulator
(one set shared by the peers; the package draws its own inside ``fit``), the same observations
and reference posteriors as ``benchmarks/sbibm_bar.py`` uses for the package, and its draws are
scored by the same C2ST. A peer is a short script written the way its users write it:

- **flowjax NPE**: an RQ-spline coupling flow (5 layers, conditioner width 50, 8 knots on
  [-5, 5]) over standardized parameters and data, trained by flowjax's ``fit_to_data`` (Adam 5e-4,
  batch 256, 10% held out, early stopping after 10 epochs without improvement, best kept).
- **sbi NPE**: ``sbi.inference.NPE(prior)`` with its defaults (a MAF, early stopping, its own
  standardization, rejection of draws outside the prior), torch on the CPU.
- **sbi NPE (NSF)**: the same with ``density_estimator="nsf"``, the density sbibm's NPE uses.

Wall time is what the peer's user waits for with the simulations in hand: building, compiling
and training (imports and sampling apart; sampling is reported separately). Used by
``python benchmarks/sbibm_bar.py --peers flowjax sbi``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VENVS = ROOT / "benchmarks" / ".peers"

REQUIREMENTS = {
    "flowjax": ["flowjax==19.1.2"],
    "sbi": ["torch==2.13.0", "sbi==0.27.0"],  # the CPU build of torch on this machine's disk
}

# the priors of the sbibm tasks, as each peer needs them (sbi rejects draws outside them)
PRIORS = {
    "two_moons": {"kind": "box", "low": -1.0, "high": 1.0, "dim": 2},
    "gaussian_linear": {"kind": "normal", "var": 0.1, "dim": 10},
}

FLOWJAX = """
import json, sys, time
import numpy as np
import jax, jax.numpy as jnp, jax.random as jr
from flowjax.bijections import RationalQuadraticSpline
from flowjax.distributions import Normal
from flowjax.flows import coupling_flow
from flowjax.train import fit_to_data

data = np.load(sys.argv[1])
theta, x, xs, n = data["theta"], data["x"], data["xs"], int(data["num_draws"])
t0 = time.perf_counter()
tm, ts, xm, xsd = theta.mean(0), theta.std(0), x.mean(0), x.std(0)
flow = coupling_flow(jr.key(0), base_dist=Normal(jnp.zeros(theta.shape[1])),
                     transformer=RationalQuadraticSpline(knots=8, interval=5),
                     cond_dim=x.shape[1], flow_layers=5, nn_width=50)
flow, losses = fit_to_data(jr.key(1), flow, ((theta - tm) / ts, (x - xm) / xsd),
                           learning_rate=5e-4, batch_size=256, max_epochs=1000,
                           max_patience=10, show_progress=False)
jax.block_until_ready(jax.tree.leaves(flow))
train = time.perf_counter() - t0
t1 = time.perf_counter()
draws = np.stack([np.asarray(flow.sample(jr.key(2 + i), (n,), condition=(xo - xm) / xsd))
                  * ts + tm for i, xo in enumerate(xs)])
sample = (time.perf_counter() - t1) / len(xs)
np.save(sys.argv[2], draws)
open(sys.argv[2] + ".json", "w").write(json.dumps({"train_s": train, "sample_s": sample,
                                                    "epochs": len(losses["train"])}))
"""

SBI = """
import json, sys, time
import numpy as np
import torch
from sbi.inference import NPE
from sbi.utils import BoxUniform

data = np.load(sys.argv[1])
theta, x, xs, n = data["theta"], data["x"], data["xs"], int(data["num_draws"])
prior_spec = json.loads(sys.argv[3])
torch.manual_seed(0)
d = prior_spec["dim"]
if prior_spec["kind"] == "box":
    prior = BoxUniform(prior_spec["low"] * torch.ones(d), prior_spec["high"] * torch.ones(d))
else:
    prior = torch.distributions.MultivariateNormal(torch.zeros(d),
                                                   prior_spec["var"] * torch.eye(d))
t0 = time.perf_counter()
inference = NPE(prior=prior, density_estimator=sys.argv[4])
estimator = inference.append_simulations(torch.as_tensor(theta, dtype=torch.float32),
                                         torch.as_tensor(x, dtype=torch.float32)).train()
posterior = inference.build_posterior(estimator)
train = time.perf_counter() - t0
t1 = time.perf_counter()
draws = np.stack([posterior.sample((n,), x=torch.as_tensor(xo, dtype=torch.float32),
                                   show_progress_bars=False).numpy() for xo in xs])
sample = (time.perf_counter() - t1) / len(xs)
np.save(sys.argv[2], draws)
open(sys.argv[2] + ".json", "w").write(json.dumps({
    "train_s": train, "sample_s": sample,
    "epochs": int(inference.summary["epochs_trained"][-1])}))
"""

SCRIPTS = {"flowjax": FLOWJAX, "sbi": SBI, "sbi_nsf": SBI}
OPTIONS = {"sbi": ["maf"], "sbi_nsf": ["nsf"]}  # extra arguments of the script


def python_of(peer):
    """The peer's virtual environment's interpreter, creating the environment when missing."""
    venv = VENVS / ("sbi" if peer.startswith("sbi") else peer)
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"  creating {venv} (once) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--upgrade", "pip"],
                       check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet",
                        *REQUIREMENTS[venv.name]], check=True)
    return python


def run_peer(peer, task, theta, x, xs, num_draws):
    """Train ``peer`` on ``(theta, x)`` and draw ``num_draws`` for each row of ``xs``:
    ``(draws (len(xs), num_draws, dim), {"train_s", "sample_s", "epochs"})``."""
    python = python_of(peer)
    with tempfile.TemporaryDirectory() as tmp:
        inputs, out, script = Path(tmp) / "in.npz", Path(tmp) / "draws.npy", Path(tmp) / "p.py"
        np.savez(inputs, theta=np.asarray(theta, np.float32), x=np.asarray(x, np.float32),
                 xs=np.asarray(xs, np.float32), num_draws=num_draws)
        script.write_text(textwrap.dedent(SCRIPTS[peer]))
        done = subprocess.run([str(python), str(script), str(inputs), str(out),
                               json.dumps(PRIORS[task]), *OPTIONS.get(peer, [])],
                              check=False, capture_output=True, text=True, cwd=tmp)
        if done.returncode:
            raise RuntimeError(f"{peer} on {task} failed:\n{done.stderr[-3000:]}")
        info = json.loads(Path(f"{out}.json").read_text())
        return np.load(out), info
