"""Diagnostics of amortized posteriors."""

from numpyro_amortized.diagnostics.c2st import c2st
from numpyro_amortized.diagnostics.mmd import mmd

__all__ = ["c2st", "mmd"]
