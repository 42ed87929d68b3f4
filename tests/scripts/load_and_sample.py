"""Load a saved guide in a fresh process and sample (tests/test_scale.py).

Usage: python load_and_sample.py CHECKPOINT OUT.npy
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np

import numpyro_amortized
from numpyro_amortized.examples.models import linear_regression

guide, params = numpyro_amortized.load(sys.argv[1], linear_regression)
x = jnp.linspace(0.0, 1.0, 12)
draws = guide.sample_posterior(jax.random.PRNGKey(7), params, x=x, y=1.0 + 2.0 * x + 0.5 * jnp.sin(9.0 * x),
                               sample_shape=(100,))
np.save(sys.argv[2], np.concatenate([draws["beta"], draws["sigma"][:, None]], axis=1))
