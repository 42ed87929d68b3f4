"""Everyday models: the guide with the package defaults against NUTS, raw and through posterior().

The models are written the way NumPyro users write them (covariates as plain arguments, vague
priors, a group index, `scan`, a hierarchical plate). For each model one guide is trained with
`fit`'s defaults on the model's arguments; then, on 5 prior-predictive datasets and one
real-scale or tail dataset per model, NUTS (4 chains x 1,000 draws after 1,000 warm-up steps)
is the reference, and the C2ST (exact sbibm recipe, 1,000 draws a side) of the guide's raw
draws and of `posterior(...)`'s draws against it is recorded, with the path `posterior` took
and the time per dataset of each path.

Writes benchmarks/results/zoo.json and the ZOO section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.contrib.control_flow import scan
from numpyro.handlers import reparam
from numpyro.infer import Predictive
from numpyro.infer.reparam import LocScaleReparam

sys.path.insert(0, str(Path(__file__).parent))
from run import machine, write_markdown

from numpyro_amortized import AutoAmortizedFlow, fit, posterior
from numpyro_amortized.compare import NUTSRunner
from numpyro_amortized.compare.draws import flatten_draws
from numpyro_amortized.compare.report import standardized_differences
from numpyro_amortized.diagnostics import c2st
from numpyro_amortized.examples.hierarchical import eight_schools_noncentered
from numpyro_amortized.train import GuideCheckWarning

RESULTS = Path(__file__).parent / "results" / "zoo.json"


# ------------------------------------------------------------------------------- the models
def linear_regression(x, y=None):
    """Two covariates, vague priors (the Pyro introduction's scale)."""
    a = numpyro.sample("a", dist.Normal(0.0, 10.0))
    b = numpyro.sample("b", dist.Normal(0.0, 10.0).expand([2]).to_event(1))
    sigma = numpyro.sample("sigma", dist.Uniform(0.0, 10.0))
    with numpyro.plate("N", x.shape[0]):
        numpyro.sample("y", dist.Normal(a + x @ b, sigma), obs=y)


def logistic_regression(X, y=None):
    b0 = numpyro.sample("b0", dist.Normal(0.0, 2.5))
    b = numpyro.sample("b", dist.Normal(0.0, 2.5).expand([X.shape[1]]).to_event(1))
    with numpyro.plate("N", X.shape[0]):
        numpyro.sample("y", dist.Bernoulli(logits=b0 + X @ b), obs=y)


def poisson_regression(x, y=None):
    a = numpyro.sample("a", dist.Normal(1.0, 1.0))
    b = numpyro.sample("b", dist.Normal(0.0, 0.5))
    with numpyro.plate("N", x.shape[0]):
        numpyro.sample("y", dist.Poisson(jnp.exp(a + b * x)), obs=y)


def varying_intercepts(group, num_groups, y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfNormal(2.0))
    with numpyro.plate("groups", num_groups):
        a = numpyro.sample("a", dist.Normal(mu, tau))
    sigma = numpyro.sample("sigma", dist.HalfNormal(2.0))
    with numpyro.plate("N", group.shape[0]):
        numpyro.sample("y", dist.Normal(a[group], sigma), obs=y)


def ar1(T, y=None):
    phi = numpyro.sample("phi", dist.Uniform(-1.0, 1.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))

    def step(prev, y_t):
        y_t = numpyro.sample("y", dist.Normal(phi * prev, sigma), obs=y_t)
        return y_t, None

    scan(step, jnp.zeros(()), y if y is not None else None, length=T)


def eight_schools(sigma, y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
    with numpyro.plate("J", sigma.shape[0]):
        theta = numpyro.sample("theta", dist.Normal(mu, tau))
        numpyro.sample("y", dist.Normal(theta, sigma), obs=y)


def poisson_interaction(x1, x2, y=None):
    a = numpyro.sample("a", dist.Normal(1.0, 1.0))
    b = numpyro.sample("b", dist.Normal(0.0, 0.5).expand([3]).to_event(1))
    with numpyro.plate("N", x1.shape[0]):
        rate = jnp.exp(a + b[0] * x1 + b[1] * x2 + b[2] * x1 * x2)
        numpyro.sample("y", dist.Poisson(rate), obs=y)


def student_t_regression(x, y=None):
    a = numpyro.sample("a", dist.Normal(0.0, 5.0))
    b = numpyro.sample("b", dist.Normal(0.0, 5.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(2.0))
    nu = numpyro.sample("nu", dist.Gamma(2.0, 0.1))
    with numpyro.plate("N", x.shape[0]):
        numpyro.sample("y", dist.StudentT(nu, a + b * x, sigma), obs=y)


def gamma_glm(x, y=None):
    a = numpyro.sample("a", dist.Normal(0.0, 1.0))
    b = numpyro.sample("b", dist.Normal(0.0, 1.0))
    shape = numpyro.sample("shape", dist.Gamma(2.0, 0.5))
    with numpyro.plate("N", x.shape[0]):
        mean = jnp.exp(a + b * x)
        numpyro.sample("y", dist.Gamma(shape, shape / mean), obs=y)


def dirichlet_multinomial(num_rows, y=None):
    p = numpyro.sample("p", dist.Dirichlet(jnp.ones(4)))
    with numpyro.plate("N", num_rows):
        numpyro.sample("y", dist.Multinomial(50, p), obs=y)


def bnn(X, y=None):
    """The Pyro tutorial's Bayesian neural network: one hidden layer of 10 tanh units."""
    w1 = numpyro.sample("w1", dist.Normal(0.0, 1.0).expand([1, 10]).to_event(2))
    b1 = numpyro.sample("b1", dist.Normal(0.0, 1.0).expand([10]).to_event(1))
    w2 = numpyro.sample("w2", dist.Normal(0.0, 1.0).expand([10]).to_event(1))
    b2 = numpyro.sample("b2", dist.Normal(0.0, 1.0))
    sigma = numpyro.sample("sigma", dist.Uniform(0.0, 1.0))
    mean = jnp.tanh(X @ w1 + b1) @ w2 + b2
    with numpyro.plate("N", X.shape[0]):
        numpyro.sample("y", dist.Normal(mean, sigma), obs=y)


# NUTS's reference for a centered hierarchical model: the same posterior, non-centered (the
# centered funnel gives NUTS divergences and R-hat failures)
REFERENCE_MODELS = {"eight_schools": eight_schools_noncentered,
                    "varying_intercepts": reparam(varying_intercepts,
                                                  config={"a": LocScaleReparam(0)})}


def _models():
    """name -> (model, fixed arguments, guide options, tail dataset's latents, tail note)."""
    rng = np.random.default_rng(0)
    x2 = jnp.asarray(rng.normal(size=(50, 2)), jnp.float32)
    X3 = jnp.asarray(rng.normal(size=(100, 3)), jnp.float32)
    x1 = jnp.asarray(np.linspace(-1.5, 1.5, 60), jnp.float32)
    group = jnp.asarray(np.repeat(np.arange(6), 10), jnp.int32)
    x40 = jnp.asarray(rng.normal(size=(40, 2)), jnp.float32)
    sigma8 = jnp.asarray([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])
    return {
        "linear_regression": (linear_regression, {"x": x2}, {}, {
            "a": 9.2, "b": jnp.asarray([-1.8, 0.4]), "sigma": 0.95},
            "real scale: intercept 9.2, sigma 0.95 (as log GDP)"),
        "logistic_regression": (logistic_regression, {"X": X3}, {}, {
            "b0": -1.0, "b": jnp.asarray([2.5, -3.0, 1.5])}, "large coefficients"),
        "poisson_regression": (poisson_regression, {"x": x1}, {}, {"a": 3.0, "b": 1.0},
                               "counts up to ~400 (a 2 prior sds up)"),
        "varying_intercepts": (varying_intercepts, {"group": group, "num_groups": 6}, {}, {
            "mu": 10.0, "tau": 4.0, "a": jnp.asarray([6.0, 8.0, 10.0, 11.0, 13.0, 15.0]),
            "sigma": 1.0}, "mu 2 prior sds up, tight groups"),
        "ar1": (ar1, {"T": 50}, {"time_series": True}, {"phi": 0.97, "sigma": 0.5},
                "near unit root"),
        "eight_schools": (eight_schools, {"sigma": sigma8}, {}, None,
                          "the classic data (Rubin 1981)"),
        "eight_schools_noncentered": (eight_schools_noncentered, {"sigma": sigma8}, {}, None,
                                      "the classic data (Rubin 1981)"),
        "poisson_interaction": (poisson_interaction, {"x1": x40[:, 0], "x2": x40[:, 1]}, {},
                                {"a": 2.5, "b": jnp.asarray([0.8, -0.6, 0.5])},
                                "large rates and interaction"),
        "student_t_regression": (student_t_regression, {"x": x1[:50]}, {}, {
            "a": 20.0, "b": -3.0, "sigma": 0.5, "nu": 2.0}, "heavy tails, intercept 4 prior sds"),
        "gamma_glm": (gamma_glm, {"x": x1[:50]}, {}, {"a": 2.0, "b": -1.5, "shape": 20.0},
                      "shape 20 (near the prior's 99th percentile)"),
        "dirichlet_multinomial": (dirichlet_multinomial, {"num_rows": 10}, {}, {
            "p": jnp.asarray([0.85, 0.1, 0.04, 0.01])}, "one dominant category"),
        "bnn": (bnn, {"X": x1[:50, None]}, {}, None, "a sine curve (the Pyro tutorial's kind)"),
    }


EIGHT_SCHOOLS_Y = jnp.asarray([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])


def _datasets(name, model, fixed, tail, key, num_prior):
    """``num_prior`` prior-predictive datasets and the tail (or real) one, as kwargs."""
    sims = Predictive(model, num_samples=num_prior)(key, **fixed)
    out = [{**fixed, "y": sims["y"][i]} for i in range(num_prior)]
    if name.startswith("eight_schools"):
        out.append({**fixed, "y": EIGHT_SCHOOLS_Y})
    elif name == "bnn":
        x = np.asarray(fixed["X"][:, 0])
        noise = 0.1 * np.random.default_rng(1).normal(size=x.shape)
        out.append({**fixed, "y": jnp.asarray(np.sin(2 * x) + noise, jnp.float32)})
    else:
        rep = Predictive(model, posterior_samples={k: jnp.asarray(v)[None]
                                                   for k, v in tail.items()})
        out.append({**fixed, "y": rep(jax.random.fold_in(key, 1), **fixed)["y"][0]})
    return out


def _c2st(ref, draws, names, key, n=1000):
    a = flatten_draws(ref, names)[0]
    b = flatten_draws(draws, names)[0]
    k1, k2 = jax.random.split(key)
    a = a[np.asarray(jax.random.permutation(k1, len(a)))[:n]]
    b = b[np.asarray(jax.random.permutation(k2, len(b)))[:n]]
    return float(c2st(a, b))


def _errors(ref, draws, names):
    """Largest |mean| and |sd| errors of the raw draws, in NUTS posterior sds."""
    d = standardized_differences(flatten_draws(ref, names)[0], flatten_draws(draws, names)[0])
    return {"max_mean_error": float(np.abs(d["mean"]).max()),
            "max_sd_error": float(np.abs(d["sd"]).max())}


def bench_model(name, spec, key, num_prior=5, num_steps=None):
    model, fixed, options, tail, note = spec
    k_fit, k_data, k_eval = jax.random.split(key, 3)
    data = _datasets(name, model, fixed, tail, k_data, num_prior)
    guide = AutoAmortizedFlow(model, **options)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fit(guide, k_fit, num_steps=num_steps, progress_bar=False, **data[0])
    train_time = time.perf_counter() - t0
    fit_warned = any(issubclass(w.category, GuideCheckWarning) for w in caught)
    names = [s.name for s in guide.latent_layout.sites]
    runner = NUTSRunner(REFERENCE_MODELS.get(name, model))
    rows = []
    for i, d in enumerate(data):
        k_nuts, k_raw, k_post, k_c1, k_c2 = jax.random.split(jax.random.fold_in(k_eval, i), 5)
        ref = runner.run(k_nuts, **d)
        with warnings.catch_warnings(record=True) as caught:  # compiles, and says if outside
            warnings.simplefilter("always")
            guide.sample_posterior(k_raw, result.params, sample_shape=(1000,), **d)
        outside = any("outside the data the guide was trained" in str(w.message)
                      for w in caught)
        t = time.perf_counter()
        raw = jax.block_until_ready(guide.sample_posterior(k_raw, result.params,
                                                           sample_shape=(1000,), **d))
        t_raw = time.perf_counter() - t
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            post = posterior(guide, result.params, k_post, num_samples=1000, **d)
        rows.append({
            "dataset": i, "kind": "prior predictive" if i < num_prior else note,
            "c2st_raw": _c2st(ref.samples, raw, names, k_c1),
            "c2st_posterior": _c2st(ref.samples, post.draws, names, k_c2),
            **_errors(ref.samples, raw, names),
            "outside": outside, "method": post.method, "pareto_k": post.pareto_k, "ess": post.ess,
            "num_proposals": post.steps[0].get("num_proposals"), "reliable": post.reliable,
            "time_raw": t_raw, "time_posterior": post.seconds, "time_nuts": ref.run_time,
            "nuts_compile": ref.compile_time, "nuts_reliable": ref.diagnostics["reliable"],
        })
        print(name, rows[-1], flush=True)
    check = result.check
    return {"train_time": train_time, "num_steps": len(result.losses), "fit_warned": fit_warned,
            "check_failed_share": None if check is None else check.failed_share,
            "latent_dim": guide.latent_layout.dim, "datasets": rows}


def _warned(r):
    """What the package said before any check of a dataset: whether ``fit`` warned that the
    guide fails its held-out check (and on what share), and on how many datasets
    ``sample_posterior`` warned that the data lie outside the training simulations."""
    if "fit_warned" not in r:
        return "not recorded"
    share = r["check_failed_share"]
    fit_part = ("yes" if r["fit_warned"] else "no") + (f" ({share:.0%})" if share is not None
                                                       else "")
    return f"{fit_part} / {sum(x['outside'] for x in r['datasets'])}"


def _misses(misses):
    """The datasets above 0.6 raw C2ST, each with the warnings it came with."""
    if not misses:
        return ""
    said = []
    for name, x, r in misses:
        flags = [w for w, on in (("fit's check", r.get("fit_warned")),
                                 ("outside", x.get("outside"))) if on]
        known = "fit_warned" in r
        said.append(f"{name} {x['dataset']} ({x['c2st_raw']:.2f}; "
                    + (", ".join(flags) if flags else "no warning" if known else "not recorded")
                    + ")")
    return "Above 0.6 raw, with the warnings given: " + "; ".join(said) + ". "


def markdown(results, info):
    lines = [
        ("| model | latents | steps | train s | raw C2ST median (max) | raw max error, NUTS sds: mean "
         "/ sd | `posterior` C2ST median (max) | paths (amortized/psis/refined/nuts) "
         "| s per dataset: raw / `posterior` / NUTS | warned: fit's check / datasets outside |"),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    share_ok, nuts_bad, raw_all, misses = [], [], [], []
    for name, r in results.items():
        nuts_bad += [f"{name} {x['dataset']}" for x in r["datasets"] if not x["nuts_reliable"]]
        rows = r["datasets"]
        raw = np.array([x["c2st_raw"] for x in rows])
        post = np.array([x["c2st_posterior"] for x in rows])
        share_ok += list(post <= 0.6)
        raw_all += list(raw)
        misses += [(name, x, r) for x in rows if x["c2st_raw"] > 0.6]
        paths = [sum(x["method"] == m for x in rows)
                 for m in ("amortized", "psis", "refined+psis", "nuts")]
        lines.append(
            f"| {name} | {r['latent_dim']} | {r['num_steps']:,} | {r['train_time']:.0f} | "
            f"{np.median(raw):.2f} "
            f"({raw.max():.2f}) | {max(x['max_mean_error'] for x in rows):.2f} / "
            f"{max(x['max_sd_error'] for x in rows):.2f} | {np.median(post):.2f} "
            f"({post.max():.2f}) | "
            f"{'/'.join(map(str, paths))} | "
            f"{np.median([x['time_raw'] for x in rows]):.3f} / "
            f"{np.median([x['time_posterior'] for x in rows]):.2f} / "
            f"{np.median([x['time_nuts'] for x in rows]):.2f} | {_warned(r)} |")
    lines.append("")
    raw_all = np.array(raw_all)
    lines.append(f"Raw C2ST <= 0.6 on {np.sum(raw_all <= 0.6)} of {len(raw_all)} datasets, "
                 f"<= 0.7 on {np.sum(raw_all <= 0.7)}; "
                 f"`posterior` C2ST <= 0.6 on {sum(share_ok)} of {len(share_ok)}. "
                 + _misses(misses) +
                 "NUTS failed its own checks (R-hat, ESS, divergences) on "
                 + (", ".join(nuts_bad) if nuts_bad else "none")
                 + f". Machine: {info['cpu_count']} cores, {info['devices'][0]}, "
                 f"jax {info['jax']}.")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="*", default=None)
    parser.add_argument("--num-steps", type=int, default=None,
                        help="training steps (default: fit's default)")
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help="the JSON file to add results to")
    parser.add_argument("--merge", type=Path, nargs="*", default=(),
                        help="more result files (models run in other processes) to merge in")
    parser.add_argument("--markdown-only", action="store_true",
                        help="rewrite the docs table from the results, running nothing")
    parser.add_argument("--no-markdown", action="store_true")
    args = parser.parse_args()
    models = _models()
    saved = (json.loads(args.results.read_text()) if args.results.exists()
             else {"results": {}})
    for other in args.merge:
        more = json.loads(other.read_text())
        saved["results"].update(more["results"])
        saved.setdefault("machine", more.get("machine"))
    info = saved.get("machine") or machine()
    if not args.markdown_only:
        info = machine()
        for name in args.models or list(models):
            key = jax.random.PRNGKey(list(models).index(name))  # the same whatever is chosen
            saved["results"][name] = bench_model(name, models[name], key,
                                                 num_steps=args.num_steps)
            saved["machine"] = info
            args.results.parent.mkdir(exist_ok=True)
            args.results.write_text(json.dumps(saved, indent=1))
    elif args.merge:
        args.results.write_text(json.dumps(saved, indent=1))
    ordered = {k: saved["results"][k] for k in models if k in saved["results"]}
    text = markdown(ordered, info)
    print(text)
    if not args.no_markdown:
        write_markdown("ZOO", text)


if __name__ == "__main__":
    main()
