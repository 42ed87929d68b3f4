"""One process of a multi-process training run (tests/test_scale.py starts two of these).

Usage: python distributed_fit.py PORT NUM_PROCESSES PROCESS_ID OUT.npz [CHECKPOINT]
With NUM_PROCESSES=0 it trains in a single process on all its local devices instead.
"""

import sys
from functools import partial

import jax

port, num_processes, process_id, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), \
    sys.argv[4]
checkpoint = sys.argv[5] if len(sys.argv) > 5 else None
if num_processes:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                               num_processes=num_processes, process_id=process_id,
                               initialization_timeout=120)

import jax.numpy as jnp
import numpy as np

from numpyro_amortized import AutoAmortizedFlow, fit
from numpyro_amortized.checkpoint import flatten_tree
from numpyro_amortized.examples.models import linear_regression
from numpyro_amortized.networks import ensemble_flow, spline_flow

# small flows: what is tested is that the processes agree, and XLA compilation dominates the run
small = {"num_layers": 2, "hidden": (32,)}
z = jnp.zeros(15)
guide = AutoAmortizedFlow(linear_regression, set_sizes=(5, 15), num_pilot_simulations=512,
                          flow=partial(spline_flow, **small))
result = fit(guide, jax.random.PRNGKey(0), x=z, y=z, num_steps=8, batch_size=64, num_chunks=2,
             validation_size=64, progress_bar=False, checkpoint=checkpoint)
local = lambda tree: flatten_tree(jax.tree.map(lambda a: np.asarray(a.addressable_shards[0].data),
                                               tree))
params = local(result.state.params)
# a fixed budget: a flow ensemble, whose mixture weights are fitted on the held-out bank (two
# affine members, one vectorized flow: compiling is most of this run)
bank_guide = AutoAmortizedFlow(linear_regression, set_sizes=(5, 15), num_pilot_simulations=512,
                               flow=partial(ensemble_flow, transformers=("affine", "affine"),
                                            **small))
bank = fit(bank_guide, jax.random.PRNGKey(1), x=z, y=z, num_steps=8, batch_size=64, num_chunks=2,
           num_simulations=1280, progress_bar=False, weight_decay=(0.0, 2.0), check=False)
weights = local(bank.params[bank_guide.param_name]["flow"]["log_weights"])
np.savez(out, losses=result.losses, devices=len(jax.devices()),
         processes=jax.process_count(), **{f"param{i}": v for i, v in enumerate(params.values())},
         log_weights=next(iter(weights.values())))
if num_processes:
    jax.distributed.shutdown()
