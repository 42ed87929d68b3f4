"""Training: the pure step, the optimizer, callbacks and the ``fit`` loop.

- :func:`trainer`: ``Trainer(init, update)``, pure and jittable (also under ``jax.pmap``).
- :func:`default_optimizer`: Adam with cosine decay, clipping and per-parameter weight decay
  (:func:`flow_weight_decay`: a flow's, or one per member of a flow ensemble);
  :func:`averaged` adds a moving average of the parameters (:func:`average_params`).
- :func:`held_out_check`, :func:`data_check`: the guide against the model's exact density on
  held-out simulations and on the data given to :func:`fit` (what it checks at the end).
- :func:`fit`: a loop over compiled chunks of steps with :class:`Callback` objects
  (:class:`Converge`, :class:`Plateau`, :class:`TimeBudget`, :class:`Checkpointer`,
  :class:`ProgressBar`, or your own).
"""

from numpyro_amortized.train.callbacks import (
    Callback,
    Chunk,
    Converge,
    Plateau,
    ProgressBar,
    Run,
    TimeBudget,
)
from numpyro_amortized.train.check import (
    GuideCheckWarning,
    HeldOutCheck,
    data_check,
    held_out_check,
)
from numpyro_amortized.train.checkpointing import Checkpointer
from numpyro_amortized.train.loop import FitResult, fit
from numpyro_amortized.train.optim import (
    ENSEMBLE_WEIGHT_DECAY,
    AveragedState,
    average_params,
    averaged,
    default_optimizer,
    fixed_budget_weight_decay,
    flow_weight_decay,
)
from numpyro_amortized.train.sharding import data_mesh
from numpyro_amortized.train.step import StepInfo, Trainer, TrainState, trainer
from numpyro_amortized.train.watchdog import TrainingStalled

__all__ = [
    "ENSEMBLE_WEIGHT_DECAY",
    "AveragedState",
    "Callback",
    "Checkpointer",
    "Chunk",
    "Converge",
    "FitResult",
    "GuideCheckWarning",
    "HeldOutCheck",
    "Plateau",
    "ProgressBar",
    "Run",
    "StepInfo",
    "TimeBudget",
    "TrainState",
    "Trainer",
    "TrainingStalled",
    "average_params",
    "averaged",
    "data_check",
    "data_mesh",
    "default_optimizer",
    "fit",
    "fixed_budget_weight_decay",
    "flow_weight_decay",
    "held_out_check",
    "trainer",
]
