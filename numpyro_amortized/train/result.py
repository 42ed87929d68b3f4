"""What :func:`~numpyro_amortized.fit` returns."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from numpyro_amortized.train.step import TrainState

__all__ = ["FitResult"]


class FitResult(NamedTuple):
    """The result of :func:`fit`.

    :param params: trained parameters, ``{guide.param_name: ...}`` as ``SVI.get_params`` gives.
    :param losses: training loss per step.
    :param validation_losses: ``(steps, losses)`` of the held-out loss during training.
    :param state: the final :class:`~numpyro_amortized.train.TrainState` (to continue training).
    :param num_skipped: updates skipped because the loss or gradient was not finite.
    :param num_dropped: simulations dropped because they contained NaN or infinity.
    :param num_simulations: simulations used for training (drawn online, or the bank size).
    :param compile_time: seconds spent compiling; :param train_time: seconds spent training.
    :param best_step: the step with the lowest validation loss (``params`` are that step's
        with ``keep_best``, the last step's otherwise); ``best_validation_loss`` its loss.
    :param interrupted: training was stopped early (``KeyboardInterrupt``).
    :param stopped_early: training ended before ``num_steps``: the validation loss stopped
        improving after the last learning-rate reduction (``patience``), or (online, by
        default) the run converged (:class:`~numpyro_amortized.train.Converge`).
    :param check: the guide checked against the model's exact density on held-out simulations
        (a :class:`~numpyro_amortized.train.HeldOutCheck`: k-hat and ESS per simulation), or
        ``None`` with ``check=False``.
    :param config: the run's settings, the flow the guide was built with, and the plateau
        counters (what a resumed run is checked against and continues from).
    """

    params: dict
    losses: np.ndarray
    validation_losses: tuple
    state: TrainState
    num_skipped: int
    num_dropped: int
    num_simulations: int
    compile_time: float
    train_time: float
    best_step: int = -1
    best_validation_loss: float = float("inf")
    interrupted: bool = False
    stopped_early: bool = False
    config: dict | None = None
    check: object = None
