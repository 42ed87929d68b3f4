"""A training run that tests/test_scale.py interrupts with SIGINT and resumes.

Usage: python interruptible_fit.py CHECKPOINT OUT.npz [resume]
"""

import functools
import signal
import sys

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

from numpyro_amortized import AutoAmortizedFlow, fit
from numpyro_amortized.checkpoint import flatten_tree
from numpyro_amortized.networks import affine_flow


def model(y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    with numpyro.plate("N", 5):
        numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)


# a process started in the background by a non-interactive shell inherits SIGINT as ignored;
# this run stands for an interactive one, where Ctrl-C raises KeyboardInterrupt
signal.signal(signal.SIGINT, signal.default_int_handler)
checkpoint, out = sys.argv[1], sys.argv[2]
resume = checkpoint if sys.argv[3:] == ["resume"] else None
guide = AutoAmortizedFlow(model, num_pilot_simulations=256,
                          flow=functools.partial(affine_flow, num_layers=2, hidden=(16,)))
result = fit(guide, jax.random.PRNGKey(0), y=jnp.zeros(5), num_steps=6000, batch_size=32,
             num_chunks=300, validation_size=64, progress_bar=False, checkpoint=checkpoint,
             checkpoint_every=1000, resume=resume)
print("interrupted" if result.interrupted else "finished", int(result.state.step), flush=True)
np.savez(out, losses=result.losses, interrupted=result.interrupted,
         step=int(result.state.step), **flatten_tree({"final": result.state.params,
                                                       "best": result.params}))
