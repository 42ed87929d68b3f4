"""Run in a subprocess with 4 forced CPU devices (tests/test_scale.py): the loss trajectory of
fit on 1, 2 and 4 devices, and one update in its jit-sharded and pmap forms on the same
simulations. Prints a JSON line."""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from numpyro_amortized import AutoAmortizedFlow, fit
from numpyro_amortized.examples.models import linear_regression
from numpyro_amortized.networks import affine_flow
from numpyro_amortized.train import data_mesh, trainer


def small_guide():
    return AutoAmortizedFlow(linear_regression, set_sizes=(5, 15), num_pilot_simulations=512,
                             flow=functools.partial(affine_flow, num_layers=2, hidden=(32,)))


assert len(jax.devices()) == 4
z = jnp.zeros(15)
STEPS, BATCH = 30, 64
out = {"losses": {}}
for n in (1, 2, 4):
    guide = small_guide()
    result = fit(guide, jax.random.PRNGKey(0), x=z, y=z, num_steps=STEPS, batch_size=BATCH,
                 num_chunks=3, validation_size=64, progress_bar=False, devices=n)
    out["losses"][n] = result.losses.tolist()
    out.setdefault("sharding", {})[n] = str(result.state.params["flow"]["bijections"][0]
                                            ["stacked"]["bijections"][0]["conditioner"]["hidden"][0]["bias"].sharding.spec)

# one update: sharded jit vs pmap, on the same global batch of simulations
guide = small_guide()
mesh = data_mesh(4)
sharded = trainer(guide, optimizer=optax.adam(1e-3), batch_size=BATCH,
                  data_sharding=NamedSharding(mesh, P("data")))
mapped = trainer(guide, optimizer=optax.adam(1e-3), batch_size=BATCH, axis_name="d")
state = sharded.init(jax.random.PRNGKey(1), x=z, y=z)
sims = guide.simulate(jax.random.PRNGKey(2), BATCH, x=z, y=z)
sims = sims._replace(valid=sims.valid.at[:5].set(False))  # unequal drops per device
new_jit, info_jit = jax.jit(lambda s, b: sharded.update(s, x=z, y=z, simulations=b))(
    jax.device_put(state, NamedSharding(mesh, P())), sims)
stacked = jax.tree.map(lambda a: jnp.broadcast_to(a, (4,) + a.shape), state)
per_device = jax.tree.map(lambda a: a.reshape((4, BATCH // 4) + a.shape[1:]), sims)
new_pmap, info_pmap = jax.pmap(lambda s, b: mapped.update(s, x=z, y=z, simulations=b),
                               axis_name="d")(stacked, per_device)
diffs = [float(jnp.max(jnp.abs(a - b[0]))) for a, b in
         zip(jax.tree.leaves(new_jit.params), jax.tree.leaves(new_pmap.params), strict=True)]
moved = [float(jnp.max(jnp.abs(a - b))) for a, b in
         zip(jax.tree.leaves(new_jit.params), jax.tree.leaves(state.params), strict=True)]
out["pmap"] = {"max_param_diff": max(diffs), "max_param_change": max(moved),
               "loss_jit": float(info_jit.loss), "loss_pmap": np.asarray(info_pmap.loss).tolist(),
               "dropped_pmap": np.asarray(info_pmap.num_dropped).tolist()}
# pmap simulating online, each device its own keys
online, info = jax.pmap(lambda s: mapped.update(s, x=z, y=z), axis_name="d")(stacked)
out["pmap_online"] = {"loss": np.asarray(info.loss).tolist(), "step": int(online.step[0])}
print(json.dumps(out))
