"""Diagnostics of amortized posteriors."""

from numpyro_amortized.diagnostics.c2st import c2st

__all__ = ["c2st"]
