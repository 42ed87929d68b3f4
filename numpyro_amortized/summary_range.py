"""Where the training simulations lie in summary space, to flag data outside it.

A guide is trained on simulations from the model; on data unlike any of them its answer is an
extrapolation. After training, the summaries of held-out simulations define the range: their
mean and (shrunk) covariance from one half, and from the other half the largest Mahalanobis
distance to that mean. A dataset farther than every held-out simulation is outside: under the
model this happens with probability at most ``1 / (m + 1)`` for ``m`` held-out simulations
(a conformal bound), so the check rarely fires on data the model describes.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import jax
import numpy as np

from numpyro_amortized.compile_options import jit_once

__all__ = ["SummaryRange"]


class SummaryRange(NamedTuple):
    """The range of the training simulations' summaries.

    :param loc: ``(S,)`` mean summary.
    :param whiten: ``(S, S)`` matrix ``W`` such that ``|W (s - loc)|`` is the Mahalanobis
        distance.
    :param threshold: the largest squared distance among the held-out half.
    :param num_reference: how many simulations the threshold was taken over.
    """

    loc: np.ndarray
    whiten: np.ndarray
    threshold: float
    num_reference: int

    @classmethod
    def fit(cls, summaries) -> SummaryRange:
        """The range of ``(n, S)`` summaries of simulations (n of at least 20)."""
        s = np.asarray(summaries, np.float64)
        s = s[np.all(np.isfinite(s), axis=1)]
        if len(s) < 20:
            raise ValueError(f"{len(s)} finite summaries: at least 20 are needed for a range.")
        first, second = s[0::2], s[1::2]
        loc = first.mean(0)
        cov = np.atleast_2d(np.cov(first, rowvar=False))
        # shrunk towards its diagonal's mean: summaries are often nearly collinear
        ridge = 1e-3 * np.trace(cov) / len(cov) + 1e-12
        cov = cov + ridge * np.eye(len(cov))
        whiten = np.linalg.inv(np.linalg.cholesky(cov))
        r = cls(loc, whiten, 0.0, len(second))
        return r._replace(threshold=float(r.distances(second).max()))

    @classmethod
    def of_simulations(cls, embed, params, sims, out_sharding=None) -> SummaryRange | None:
        """The range of ``embed(params, sims.data)`` over the valid simulations (``None`` with
        fewer than 20); ``out_sharding`` replicates the summaries when ``sims`` are spread over
        devices or processes."""
        def run(p, sims):
            return embed(p, sims.data), sims.valid

        shardings = None if out_sharding is None else (out_sharding, out_sharding)
        emb, valid = jit_once(run, out_shardings=shardings)(params, sims)
        if isinstance(emb, jax.Array) and not emb.is_fully_addressable:  # replicated
            emb, valid = emb.addressable_shards[0].data, valid.addressable_shards[0].data
        emb = np.asarray(emb)[np.asarray(valid)]
        return cls.fit(emb) if len(emb) >= 20 else None

    def warn_outside(self, summaries, stacklevel=2):
        """Warn, naming the datasets, when any of ``summaries`` lies outside the range."""
        out = np.flatnonzero(self.outside(np.asarray(summaries)))
        if len(out) == 0:
            return
        n, m = len(summaries), self.num_reference
        which = ("This dataset lies outside the data the guide was trained on: its summary "
                 "statistics are" if n == 1 else
                 f"{len(out)} of {n} datasets (indices {', '.join(map(str, out[:10]))}"
                 f"{', ...' if len(out) > 10 else ''}) lie outside the data the guide was "
                 "trained on: their summary statistics are")
        chance = (f"fewer than 1 in {m + 1} datasets" if n == 1 else
                  f"about {n / (m + 1):.1f} of {n} datasets by chance")
        warnings.warn(
            f"{which} farther from the training simulations' than all {m} held-out "
            f"simulations (Mahalanobis distance in summary space; under the model: {chance}). "
            "The guide extrapolates there: check the answer with numpyro_amortized.posterior, "
            "which tests it against the model's exact density.",
            UserWarning, stacklevel=stacklevel)

    def distances(self, summaries) -> np.ndarray:
        """Squared Mahalanobis distances of ``(n, S)`` summaries to the training mean."""
        z = (np.asarray(summaries, np.float64) - self.loc) @ self.whiten.T
        return np.sum(z**2, axis=-1)

    def outside(self, summaries) -> np.ndarray:
        """``(n,)``: which datasets lie beyond every held-out simulation (NaN summaries too)."""
        d = self.distances(summaries)
        return ~(d <= self.threshold)

    def to_dict(self) -> dict:
        return {"loc": np.asarray(self.loc), "whiten": np.asarray(self.whiten),
                "threshold": np.asarray(self.threshold), "num_reference":
                np.asarray(self.num_reference)}

    @classmethod
    def from_dict(cls, d, dim=None) -> SummaryRange:
        """The range from :meth:`to_dict`'s output; a ``ValueError`` when it is not a valid
        range (of summaries of length ``dim``, when given)."""
        r = cls(np.asarray(d["loc"], np.float64), np.asarray(d["whiten"], np.float64),
                float(d["threshold"]), int(d["num_reference"]))
        n = len(r.loc) if dim is None else dim
        if not (r.loc.shape == (n,) and r.whiten.shape == (n, n) and r.num_reference > 0
                and np.all(np.isfinite(r.whiten)) and np.isfinite(r.threshold)):
            raise ValueError("not a summary range for summaries of this length")
        return r
