"""Training throughput against the number of devices (data parallel), at several batch sizes.

On a CPU machine the devices are forced (``--xla_force_host_platform_device_count``), so they
share the machine's cores: the figures show the overhead and the scaling limit of the sharded
step, not the speed of more hardware. On GPUs, run it as is: it uses the real devices.

    python benchmarks/scaling.py            # writes the SCALING section of docs/benchmarks.md
    python benchmarks/scaling.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import os
import sys

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--quick", action="store_true")
parser.add_argument("--cpu-devices", type=int, default=4, help="forced CPU devices (no GPU)")
parser.add_argument("--batch-sizes", type=int, nargs="*", default=[256, 1024, 4096])
parser.add_argument("--steps", type=int, default=300)
parser.add_argument("--repeats", type=int, default=3)
ARGS = parser.parse_args()
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={ARGS.cpu_devices}")

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import machine, write_markdown

from numpyro_amortized import AutoAmortizedFlow, fit
from numpyro_amortized.examples import linear_regression

ROOT = Path(__file__).resolve().parents[1]


def measure(n_devices, batch_size, steps, repeats):
    z = jnp.zeros(15)
    guide = AutoAmortizedFlow(linear_regression, set_sizes=(5, 15))
    times, compile_times = [], []
    for r in range(repeats):
        result = fit(guide, jax.random.PRNGKey(r), x=z, y=z, num_steps=steps,
                     batch_size=batch_size, num_chunks=5, devices=n_devices, progress_bar=False)
        times.append(result.train_time)
        compile_times.append(result.compile_time)
    t = float(np.median(times))
    return {"devices": n_devices, "batch_size": batch_size, "steps": steps,
            "train_time": t, "compile_time": float(np.median(compile_times)),
            "steps_per_s": steps / t, "sims_per_s": steps * batch_size / t,
            "final_loss": float(result.losses[-1])}


def main():
    steps = 20 if ARGS.quick else ARGS.steps
    repeats = 1 if ARGS.quick else ARGS.repeats
    batch_sizes = [64] if ARGS.quick else ARGS.batch_sizes
    counts = [n for n in (1, 2, 4, 8) if n <= len(jax.devices())]
    rows = []
    for b in batch_sizes:
        for n in counts:
            row = measure(n, b, steps, repeats)
            rows.append(row)
            print(json.dumps(row), flush=True)
    info = machine()
    out = ROOT / "benchmarks" / "results" / f"scaling_{jax.default_backend()}.json"
    if not ARGS.quick:
        out.write_text(json.dumps({"machine": info, "rows": rows}, indent=1))
    base = {r["batch_size"]: r for r in rows if r["devices"] == 1}
    kind = jax.devices()[0].device_kind
    lines = [
        (f"Measured on {info['processor']}, {info['cpu_count']} cores, JAX {info['jax']}, "
        f"{len(jax.devices())} {jax.default_backend()} devices ({kind}); the variable-size "
        f"regression with the default guide, {steps} steps per run, medians of {repeats} runs, "
        "compilation apart (`python benchmarks/scaling.py`)."),
        "",
        "| batch | devices | steps/s | simulations/s | vs 1 device | compilation, s |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        ratio = r["sims_per_s"] / base[r["batch_size"]]["sims_per_s"]
        lines.append(f"| {r['batch_size']} | {r['devices']} | {r['steps_per_s']:.1f} | "
                     f"{r['sims_per_s']:,.0f} | {ratio:.2f}x | {r['compile_time']:.1f} |")
    text = "\n".join(lines)
    print(text)
    if not ARGS.quick:
        write_markdown(f"SCALING {jax.default_backend().upper()}", text)


if __name__ == "__main__":
    main()
