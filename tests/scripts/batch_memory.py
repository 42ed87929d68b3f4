"""Peak memory of sample_posterior_batch (tests/test_api.py runs it in a fresh process).

Usage: python batch_memory.py NUM_DATASETS; prints the growth of peak RSS in MB.
"""

import resource
import sys

import jax
import jax.numpy as jnp

from numpyro_amortized import AutoAmortizedFlow
from numpyro_amortized.examples import linear_regression

n = int(sys.argv[1])
g = AutoAmortizedFlow(linear_regression, set_sizes=(5, 15), num_pilot_simulations=512)
x = jnp.linspace(0, 1, 15)
y = 1 + 2 * x
p = g.setup(jax.random.PRNGKey(0), x=x, y=y)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
data = {"x": jnp.tile(x, (n, 1)), "y": jnp.tile(y, (n, 1))}
d = jax.block_until_ready(g.sample_posterior_batch(jax.random.PRNGKey(1), p, data,
                                                  sample_shape=(1000,)))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
out = sum(v.nbytes for v in d.values()) / 2**20
print(f"{peak - base:.0f} {out:.0f}", flush=True)
