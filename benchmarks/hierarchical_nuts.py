"""One hierarchical guide for every number of groups, against NUTS.

The hierarchical regression (:func:`numpyro_amortized.examples.hierarchical.varying_slopes`:
group intercepts and slopes, five globals) with groups of 5 to 30 rows (sizes drawn once; a
dataset of J groups has the first J groups' rows and covariates). One guide is set up with the
largest number of groups, ``num_groups=(5, max)``, and trained with ``fit``'s defaults (online,
length following the validation loss). Then, for prior-predictive datasets of J groups spread
over the range, the reference is NUTS on the model with the group effects integrated out
(:func:`~numpyro_amortized.examples.hierarchical.varying_slopes_collapsed`: five globals, no
funnel; 4 chains x 2,500 draws after 1,000 warm-up steps, target acceptance .99) with each
draw's intercepts and slopes drawn exactly given the globals: the C2ST of the globals (mu_a,
mu_b, log tau_a, log tau_b, log sigma; exact sbibm recipe, 1,000 draws a side) and, for every
group's intercept and slope, the mean and sd errors in reference sds. Non-centered NUTS on the
full model (4 chains x 1,000 draws) is run too, and its own globals C2ST against the reference
reported next to the guide's, and so are the draws of ``posterior`` (the guide's checked path:
PSIS, refinement or NUTS as its checks decide). Writes
benchmarks/results/hierarchical_nuts.json and the table in docs/scaling.md (between the
HIERARCHICAL_NUTS markers).

With ``--eight-schools``: eight schools written centered (as users write it) and non-centered,
one guide each with ``fit``'s defaults, against the exact posterior
(:func:`~numpyro_amortized.examples.hierarchical.eight_schools_posterior`) on the classic data
and 5 prior-predictive datasets: C2ST of (mu, log tau) and of each school's theta, and the
largest theta mean and sd errors in exact posterior sds (EIGHT_SCHOOLS markers).

With ``--binomial``: the multilevel binomial, one guide for 5 to ``--max-groups`` groups of 5 to
50 trials, against non-centered NUTS run twice (two seeds: the second run's C2ST against the
first is the reference's own noise): the globals' C2ST, the shares of groups' log-odds whose
mean and sd (and sd of the central 99%) are within 0.2 NUTS sds, and the share of draws of
``log sigma`` beyond NUTS's 0.1% and 99.9% quantiles (HIERARCHICAL_BINOMIAL markers).

    python benchmarks/hierarchical_nuts.py                  # 5 to 50 groups
    python benchmarks/hierarchical_nuts.py --max-groups 20  # a shorter run
    python benchmarks/hierarchical_nuts.py --eight-schools
    python benchmarks/hierarchical_nuts.py --binomial       # the multilevel binomial
    python benchmarks/hierarchical_nuts.py --guide run.ckpt  # train once, then reuse the guide
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.handlers import reparam
from numpyro.infer import Predictive
from numpyro.infer.reparam import LocScaleReparam
from run import machine, write_markdown

from numpyro_amortized import AutoAmortizedFlow, fit, load, posterior, save
from numpyro_amortized.compare import NUTSRunner
from numpyro_amortized.diagnostics import c2st
from numpyro_amortized.examples.hierarchical import (
    EIGHT_SCHOOLS_SIGMA,
    EIGHT_SCHOOLS_Y,
    eight_schools,
    eight_schools_noncentered,
    eight_schools_posterior,
    multilevel_binomial,
    varying_slopes,
    varying_slopes_collapsed,
    varying_slopes_locals,
)

ROOT = Path(__file__).resolve().parents[1]
GLOBALS = ("mu_a", "mu_b", "tau_a", "tau_b", "sigma")


def design(max_groups, seed=0):
    """Group index and covariate of every row: group j has 5 to 30 rows."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(5, 31, max_groups)
    group = np.repeat(np.arange(max_groups), sizes)
    return jnp.asarray(group, jnp.int32), jnp.asarray(rng.normal(size=group.size), jnp.float32)


def _globals(draws, n=1000):
    cols = [np.asarray(draws[k]) if k.startswith("mu") else np.log(np.asarray(draws[k]))
            for k in GLOBALS]
    return np.column_stack(cols)[:n]


def train(model, args, kwargs, max_groups, num_steps, path=None):
    """A guide of ``model`` for 5 to ``max_groups`` groups and its training record; with
    ``path``, loaded from there if it exists (its record from ``path + ".json"``), else trained
    and saved there (checkpointed on the way to ``path + ".run"``, from which a run stopped
    before its end continues)."""
    guide = AutoAmortizedFlow(model, num_groups=(5, max_groups))
    if path is not None and Path(path).exists():
        guide, params = load(path, model, guide=guide)
        return guide, params, json.loads(Path(path + ".json").read_text())
    # a run stopped before its end is continued from its last checkpoint
    run_path = None if path is None else path + ".run"
    resume = run_path if run_path is not None and Path(run_path).exists() else None
    t0 = time.perf_counter()
    result = fit(guide, jax.random.PRNGKey(0), *args, **kwargs, num_steps=num_steps,
                 progress_bar=True, checkpoint=run_path, resume=resume)
    check = result.check
    record = {"train_s": time.perf_counter() - t0 if resume is None else result.train_time,
              "resumed": resume is not None, "num_steps": len(result.losses),
              "check_failed_share": None if check is None else float(check.failed_share)}
    if check is not None and check.raw_error is not None:
        record.update(check_khat_share=float(np.mean(check.pareto_k > 0.7)),
                      check_raw_error=[float(np.median(check.raw_error)),
                                       float(np.max(check.raw_error))])
    if path is not None:
        save(path, guide, result)
        Path(path + ".json").write_text(json.dumps(record))
    print(record, flush=True)
    return guide, result.params, record


def _group_errors(draws, ref):
    """The groups' intercepts' and slopes' mean errors in reference sds, and their sd ratios."""
    mean_err = np.concatenate([np.abs(np.asarray(draws[k]).mean(0) - ref[k].mean(0))
                               / ref[k].std(0) for k in ("a", "b")])
    sd_ratio = np.concatenate([np.asarray(draws[k]).std(0) / ref[k].std(0) for k in ("a", "b")])
    return mean_err, sd_ratio


def reference(key, group, x, num_groups, y):
    """Draws of the exact posterior up to NUTS on the 5 globals of the collapsed model."""
    runner = NUTSRunner(varying_slopes_collapsed, num_samples=2500, target_accept_prob=0.99)
    ref = runner.run(key, group, x, num_groups, y)
    draws = {k: np.asarray(v) for k, v in ref.samples.items()}
    rng = np.random.default_rng(int(jax.random.randint(key, (), 0, 2**31 - 1)))
    draws.update(varying_slopes_locals(draws, group, x, num_groups, y, rng))
    perm = np.random.default_rng(0).permutation(len(draws["mu_a"]))
    return {k: v[perm] for k, v in draws.items()}, ref


def run(max_groups, num_steps, counts, path=None):
    group, x = design(max_groups)
    guide, params, record = train(varying_slopes, (group, x, max_groups),
                                  {"y": jnp.zeros(group.shape[0])}, max_groups, num_steps, path)
    noncentered = reparam(varying_slopes, config={"a": LocScaleReparam(0),
                                                  "b": LocScaleReparam(0)})
    runner = NUTSRunner(noncentered)
    rows = []
    for i, j in enumerate(counts):
        keep = np.asarray(group) < j
        g, xj = group[keep], x[keep]
        y = Predictive(varying_slopes, num_samples=1)(jax.random.PRNGKey(10 + i), g, xj,
                                                      j)["y"][0]
        ref_s, ref = reference(jax.random.PRNGKey(40 + i), g, xj, j, y)
        nuts = runner.run(jax.random.PRNGKey(20 + i), g, xj, j, y=y)
        draws = guide.sample_posterior(jax.random.PRNGKey(30 + i), params, g, xj, j,
                                       y=y, sample_shape=(4000,))
        mean_err, sd_ratio = _group_errors(draws, ref_s)
        checked = posterior(guide, params, jax.random.PRNGKey(50 + i), g, xj, j, y=y,
                            num_samples=4000)
        checked_err, _ = _group_errors(checked.draws, ref_s)
        nuts_s = {k: np.random.default_rng(i).permutation(np.asarray(v))
                  for k, v in nuts.samples.items()}
        row = {"groups": j, "rows": int(keep.sum()),
               "c2st_globals": float(c2st(_globals(ref_s), _globals(draws))),
               "nuts_c2st_globals": float(c2st(_globals(ref_s), _globals(nuts_s))),
               "within_02": float(np.mean(mean_err <= 0.2)), "max_mean_err": float(
                   mean_err.max()), "sd_within_02": float(np.mean(np.abs(sd_ratio - 1) <= 0.2)),
               "sd_ratio_min": float(sd_ratio.min()),
               "sd_ratio_max": float(sd_ratio.max()),
               "posterior_method": checked.method, "posterior_k": float(checked.pareto_k),
               "posterior_s": checked.seconds,
               "posterior_c2st_globals": float(c2st(_globals(ref_s), _globals(checked.draws))),
               "posterior_within_02": float(np.mean(checked_err <= 0.2)),
               "reference_reliable": bool(ref.diagnostics["reliable"]),
               "nuts_reliable": bool(nuts.diagnostics["reliable"]),
               "nuts_s": nuts.run_time}
        print(row, flush=True)
        rows.append(row)
    return {"max_groups": max_groups, **record, "datasets": rows}


def _sd_share(r):
    """The share of groups' sds within 0.2 reference sds, and the opening of the ratios'
    range (tables written before the share was recorded give the range only)."""
    return f"{100 * r['sd_within_02']:.0f}% (" if "sd_within_02" in r else "("


def markdown(res, info):
    lines = [(f"One guide for 5 to {res['max_groups']} groups of 5 to 30 rows, trained with "
              f"`fit`'s defaults ({res['num_steps']:,} steps, {res['train_s'] / 60:.0f} min on "
              f"{info['cpu_count']} cores, {', '.join(info['devices'])}, JAX {info['jax']}), "
              "on a prior-predictive dataset per row, against the reference: NUTS on the model "
              "with the group effects integrated out, and the group effects drawn exactly given "
              "its globals (`python benchmarks/hierarchical_nuts.py`). Non-centered NUTS on the "
              "full model is compared with the same reference."), "",
             ("| groups | rows | globals C2ST | NUTS's globals C2ST | groups' means within "
              "0.2 reference sds (largest) | groups' sds within 0.2 reference sds (ratios) | "
              "`posterior`: globals C2ST, groups within 0.2, path (k-hat), s with compilation | reference / NUTS passed "
              "their checks | "
              "NUTS s |"),
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    yes = lambda b: "yes" if b else "no"
    for r in res["datasets"]:
        lines.append(f"| {r['groups']} | {r['rows']} | {r['c2st_globals']:.3f} | "
                     f"{r['nuts_c2st_globals']:.3f} | "
                     f"{100 * r['within_02']:.0f}% ({r['max_mean_err']:.2f}) | "
                     f"{_sd_share(r)}{r['sd_ratio_min']:.2f}-{r['sd_ratio_max']:.2f}) | "
                     f"{r['posterior_c2st_globals']:.3f}, "
                     f"{100 * r['posterior_within_02']:.0f}%, {r['posterior_method']} "
                     f"({r['posterior_k']:.2f}), {r['posterior_s']:.1f} | "
                     f"{yes(r['reference_reliable'])} / {yes(r['nuts_reliable'])} | "
                     f"{r['nuts_s']:.1f} |")
    share = lambda key: (sum(r[key] * 2 * r["groups"] for r in res["datasets"])
                         / sum(2 * r["groups"] for r in res["datasets"]))
    sds = (f" and {100 * share('sd_within_02'):.1f}% their sd"
           if all("sd_within_02" in r for r in res["datasets"]) else "")
    lines += ["", (f"Over all datasets, {100 * share('within_02'):.1f}% of the groups' intercepts "
                   f"and slopes have their mean within 0.2 reference sds{sds}. "
                   f"{_check_text(res)} NUTS's checks "
                   "are R-hat, ESS and divergences.")]
    return "\n".join(lines)


def run_eight_schools():
    sims = Predictive(eight_schools, num_samples=5)(jax.random.PRNGKey(5), EIGHT_SCHOOLS_SIGMA)
    data = [EIGHT_SCHOOLS_Y] + [sims["y"][i] for i in range(5)]
    rng = np.random.default_rng(0)
    exact = [eight_schools_posterior(EIGHT_SCHOOLS_SIGMA, y, 4000, rng) for y in data]
    glob = lambda d: np.column_stack([np.asarray(d["mu"]), np.log(np.asarray(d["tau"]))])
    out = {}
    for name, model in (("centered", eight_schools),
                        ("non-centered", eight_schools_noncentered)):
        guide = AutoAmortizedFlow(model)
        t0 = time.perf_counter()
        result = fit(guide, jax.random.PRNGKey(0), EIGHT_SCHOOLS_SIGMA, y=EIGHT_SCHOOLS_Y,
                     progress_bar=True)
        rows = []
        for i, (y, ex) in enumerate(zip(data, exact, strict=True)):
            d = guide.sample_posterior(jax.random.PRNGKey(i), result.params, EIGHT_SCHOOLS_SIGMA,
                                       y=y, sample_shape=(1000,))
            th, ref = np.asarray(d["theta"]), ex["theta"]
            rows.append({
                "dataset": "classic" if i == 0 else f"prior predictive {i}",
                "c2st_globals": float(c2st(glob(ex)[:1000], glob(d))),
                "c2st_theta_max": max(float(c2st(ref[:1000, j:j + 1], th[:, j:j + 1]))
                                      for j in range(8)),
                "theta_mean_err": float(np.max(np.abs(th.mean(0) - ref.mean(0)) / ref.std(0))),
                "theta_sd_err": float(np.max(np.abs(th.std(0) - ref.std(0)) / ref.std(0)))})
            print(name, rows[-1], flush=True)
        out[name] = {"train_s": time.perf_counter() - t0, "num_steps": len(result.losses),
                     "datasets": rows}
    return out


def run_binomial(max_groups, num_steps, counts, path=None):
    """The multilevel binomial: one guide for 5 to ``max_groups`` groups of 5 to 50 trials,
    against non-centered NUTS (and a second NUTS run of another seed, the reference's own
    noise) on a prior-predictive dataset per number of groups."""
    trials = jnp.asarray(np.random.default_rng(0).integers(5, 51, max_groups), jnp.int32)
    guide, params, record = train(multilevel_binomial, (trials,),
                                  {"successes": jnp.zeros_like(trials)}, max_groups, num_steps,
                                  path)
    runner = NUTSRunner(reparam(multilevel_binomial, config={"a": LocScaleReparam(0)}),
                        num_samples=2500, target_accept_prob=0.95)
    glob = lambda d: np.column_stack([np.asarray(d["a_bar"]), np.log(np.asarray(d["sigma"]))])
    rows = []
    for i, j in enumerate(counts):
        t = trials[:j]
        k = Predictive(multilevel_binomial, num_samples=1)(jax.random.PRNGKey(10 + i),
                                                          t)["successes"][0]
        refs = [runner.run(jax.random.PRNGKey(20 + 100 * r + i), t, successes=k)
                for r in range(2)]
        ref, again = ({n: np.random.default_rng(i).permutation(np.asarray(v))
                       for n, v in r.samples.items()} for r in refs)
        draws = guide.sample_posterior(jax.random.PRNGKey(30 + i), params, t,
                                       successes=k, sample_shape=(4000,))
        a, ra = np.asarray(draws["a"]), ref["a"]
        mean_err = np.abs(a.mean(0) - ra.mean(0)) / ra.std(0)
        sd_err = np.abs(a.std(0) - ra.std(0)) / ra.std(0)
        # the sds of the central 99%, and the share of draws of log sigma beyond NUTS's 0.1% and
        # 99.9% quantiles (0.2% expected): a few draws far in a tail can set a group's sd alone
        central_err = np.abs(_central_sd(a) - _central_sd(ra)) / _central_sd(ra)
        lo, hi = np.quantile(np.log(ref["sigma"]), [0.001, 0.999])
        log_sigma = np.log(np.asarray(draws["sigma"]))
        row = {"groups": j, "c2st_globals": float(c2st(glob(ref)[:1000], glob(draws)[:1000])),
               "nuts_c2st_globals": float(c2st(glob(ref)[:1000], glob(again)[:1000])),
               "mean_within_02": float(np.mean(mean_err <= 0.2)),
               "sd_within_02": float(np.mean(sd_err <= 0.2)),
               "max_mean_err": float(mean_err.max()), "max_sd_err": float(sd_err.max()),
               "central_sd_within_02": float(np.mean(central_err <= 0.2)),
               "max_central_sd_err": float(central_err.max()),
               "sigma_beyond": float(np.mean((log_sigma < lo) | (log_sigma > hi))),
               "nuts_reliable": all(bool(r.diagnostics["reliable"]) for r in refs)}
        print(row, flush=True)
        rows.append(row)
    return {"max_groups": max_groups, **record, "datasets": rows}


def _central_sd(x, mass=0.99):
    """Each column's sd over its draws within its central ``mass``."""
    lo, hi = np.quantile(x, [(1 - mass) / 2, (1 + mass) / 2], axis=0)
    inside = (x >= lo) & (x <= hi)
    return np.array([x[inside[:, j], j].std() for j in range(x.shape[1])])


def markdown_binomial(res, info):
    lines = [(f"The multilevel binomial (`examples.hierarchical.multilevel_binomial`), one guide "
              f"for 5 to {res['max_groups']} groups of 5 to 50 trials, `fit`'s defaults "
              f"({res['num_steps']:,} steps, {res['train_s'] / 60:.0f} min on "
              f"{info['cpu_count']} cores), against non-centered NUTS (4 chains x 2,500 draws, "
              "target acceptance .95) on a prior-predictive dataset per row; a second NUTS run "
              "of another seed gives the reference's own C2ST "
              "(`python benchmarks/hierarchical_nuts.py --binomial`)."), "",
             ("| groups | (a_bar, log sigma) C2ST | NUTS against NUTS | groups' means within "
              "0.2 NUTS sds (largest) | groups' sds within 0.2 NUTS sds (largest) | the same, "
              "central 99% | log sigma beyond NUTS's 0.1/99.9% | NUTS passed its checks |"),
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in res["datasets"]:
        lines.append(f"| {r['groups']} | {r['c2st_globals']:.3f} | {r['nuts_c2st_globals']:.3f} "
                     f"| {100 * r['mean_within_02']:.0f}% ({r['max_mean_err']:.2f}) | "
                     f"{100 * r['sd_within_02']:.0f}% ({r['max_sd_err']:.2f}) | "
                     f"{100 * r['central_sd_within_02']:.0f}% ({r['max_central_sd_err']:.2f}) | "
                     f"{100 * r['sigma_beyond']:.2f}% | "
                     f"{'yes' if r['nuts_reliable'] else 'no'} |")
    n = sum(r["groups"] for r in res["datasets"])
    share = lambda key: sum(r[key] * r["groups"] for r in res["datasets"]) / n
    lines += ["", (f"Over all datasets: {100 * share('mean_within_02'):.1f}% of the groups' "
                   f"means and {100 * share('sd_within_02'):.1f}% of their sds within 0.2 NUTS "
                   f"sds. {_check_text(res)}")]
    return "\n".join(lines)


def _check_text(res):
    """fit's held-out check, in words."""
    text = (f"Held-out check (fit's `check`): failed on {100 * res['check_failed_share']:.0f}% "
            "of 32 held-out simulations")
    if "check_raw_error" not in res:
        return text + "."
    med, top = res["check_raw_error"]
    largest = f"{top:,.0f}" if top >= 100 else f"{top:.2f}"
    return (f"{text} (k-hat > 0.7 on {100 * res['check_khat_share']:.0f}%; raw draws' error "
            f"median {med:.2f}, largest {largest} posterior sds).")


def markdown_eight_schools(res, info):
    lines = [(f"Eight schools, one guide per way of writing it, `fit`'s defaults, against the "
              f"exact posterior ({info['cpu_count']} cores, JAX {info['jax']}; "
              "`python benchmarks/hierarchical_nuts.py --eight-schools`). C2ST of each "
              "school's theta: the largest of the eight; errors: the largest over schools, in "
              "exact posterior sds."), "",
             ("| model | steps | train s | dataset | (mu, log tau) C2ST | theta C2ST | "
             "theta mean error | theta sd error |"),
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in res.items():
        for x in r["datasets"]:
            lines.append(f"| {name} | {r['num_steps']:,} | {r['train_s']:.0f} | {x['dataset']} "
                         f"| {x['c2st_globals']:.3f} | {x['c2st_theta_max']:.3f} | "
                         f"{x['theta_mean_err']:.2f} | {x['theta_sd_err']:.2f} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-groups", type=int, default=50)
    parser.add_argument("--num-steps", type=int, default=None,
                        help="training steps (default: fit's default)")
    parser.add_argument("--eight-schools", action="store_true")
    parser.add_argument("--binomial", action="store_true",
                        help="the multilevel binomial instead of the regression")
    parser.add_argument("--guide", default=None,
                        help="checkpoint of the guide: loaded if it exists, else written")
    parser.add_argument("--markdown-only", action="store_true",
                        help="rewrite the docs table from the saved results, running nothing")
    opts = parser.parse_args()
    if opts.markdown_only:
        saved = json.loads((ROOT / "benchmarks" / "results" / "hierarchical_nuts.json").read_text())
        write_markdown("HIERARCHICAL_NUTS", markdown(saved, saved["machine"]), doc="scaling.md")
        return
    if opts.eight_schools:
        res, info = run_eight_schools(), machine()
        out = ROOT / "benchmarks" / "results" / "eight_schools.json"
        out.write_text(json.dumps({"machine": info, "results": res}, indent=1))
        write_markdown("EIGHT_SCHOOLS", markdown_eight_schools(res, info), doc="scaling.md")
        return
    top = opts.max_groups
    counts = sorted({5, round(5 + (top - 5) / 4), round(5 + (top - 5) / 2),
                     round(5 + 3 * (top - 5) / 4), top})
    if opts.binomial:
        res, info = run_binomial(top, opts.num_steps, counts, opts.guide), machine()
        out = ROOT / "benchmarks" / "results" / "hierarchical_binomial.json"
        out.write_text(json.dumps({"machine": info, **res}, indent=1))
        write_markdown("HIERARCHICAL_BINOMIAL", markdown_binomial(res, info), doc="scaling.md")
        return
    res = run(top, opts.num_steps, counts, opts.guide)
    info = machine()
    out = ROOT / "benchmarks" / "results" / "hierarchical_nuts.json"
    out.write_text(json.dumps({"machine": info, **res}, indent=1))
    write_markdown("HIERARCHICAL_NUTS", markdown(res, info), doc="scaling.md")


if __name__ == "__main__":
    main()
