"""A fit whose update never returns from step 30 on (an optimizer that spins forever), with a
3 s stall limit: prints what the stall left behind, then exits without waiting for the spinning
computation. Argument: the checkpoint path."""

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
import optax

from numpyro_amortized import AutoAmortizedFlow, fit
from numpyro_amortized.networks import affine_flow
from numpyro_amortized.train import TrainingStalled


def model(y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    with numpyro.plate("rows", 3):
        numpyro.sample("y", dist.Binomial(jnp.array([20, 30, 40]), logits=mu), obs=y)


def spin_from(step):
    def update(updates, count, params=None):
        # x + 1 stops changing at 2^24, so from `step` on the loop never ends
        spin = jax.lax.while_loop(lambda x: (count >= step) & (x >= 0.0), lambda x: x + 1.0, 0.0)
        return jax.tree.map(lambda u: u + 0.0 * spin, updates), count + 1

    return optax.chain(optax.adam(1e-3), optax.GradientTransformation(
        lambda params: jnp.zeros((), jnp.int32), update))


path = sys.argv[1]
guide = AutoAmortizedFlow(model, flow=affine_flow, num_pilot_simulations=256)
t0 = time.perf_counter()
out = {}
try:
    fit(guide, jax.random.PRNGKey(0), y=jnp.array([3, 4, 5]), num_steps=100, num_chunks=10,
        batch_size=32, optimizer=spin_from(30), checkpoint=path, checkpoint_every=20,
        stall_timeout=3, progress_bar=False)
except TrainingStalled as e:
    out = {"message": str(e), "seconds": time.perf_counter() - t0,
           "state_step": int(e.state.step)}
print(json.dumps(out), flush=True)
os._exit(0)
