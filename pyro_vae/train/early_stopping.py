"""Early stopping on the held-out ELBO, with a rule that knows the estimate's noise.

After each epoch the held-out ELBO is compared with the best epoch's so far, datapoint by
datapoint on the same held-out data: with d_n the difference of datapoint n's ELBO estimates
(this epoch minus the best), the improvement is the difference of the two mean ELBOs and its
standard error is sd(d_n) / √N, the paired standard error, which holds the Monte Carlo noise of
both estimates and the datapoints' spread of the change (not the spread of the ELBOs
themselves, which the pairing cancels). An epoch improves on the best when the improvement
exceeds ``min_delta`` nats per datapoint, or, without it, one paired standard error; after
``patience`` epochs without an improvement the run stops, at the end of that epoch.

The state (the best epoch, its held-out ELBO and its per-datapoint estimates) is kept in the
history's ``"early_stopping"`` entry, so it is checkpointed with the run and a resumed run
decides as the uninterrupted one would; the best epoch's weights are kept beside the last ones
(``best.safetensors`` in a run folder, :attr:`EarlyStopping.best_state` in memory).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from pyro_vae.train.loop import Callback, Loop

#: the history's entry holding the rule's state
HISTORY_KEY = "early_stopping"


def paired_improvement(current: torch.Tensor, best: torch.Tensor) -> tuple[float, float]:
    """The mean and the standard error of the per-datapoint differences ``current − best``."""
    diff = current.double() - best.double()
    n = diff.numel()
    mean = diff.mean().item()
    stderr = diff.std().item() / math.sqrt(n) if n > 1 else math.inf
    return mean, stderr


class EarlyStopping(Callback):
    """Stop after ``patience`` epochs whose held-out ELBO does not improve on the best one by
    more than ``min_delta`` (``None``: by more than one paired standard error; see the module
    docstring). Reads ``loop.held_out_values`` (the loop's held-out data scored per datapoint);
    runs before the checkpoint, which saves its state and the best weights."""

    def __init__(self, patience: int, min_delta: float | None = None) -> None:
        self.patience, self.min_delta = patience, min_delta
        #: the best epoch's weights (CPU copies), or None before the first epoch
        self.best_state: dict[str, torch.Tensor] | None = None
        #: True after an epoch that became the best: the checkpoint writes its weights then
        self.improved = False

    def state(self, loop: Loop) -> dict[str, Any] | None:
        return loop.history.extra.get(HISTORY_KEY)

    def on_epoch_end(self, loop: Loop) -> None:
        values = loop.held_out_values
        assert values is not None, "early stopping needs the held-out data scored per datapoint"
        elbo = loop.history.test_elbo[-1]
        saved = self.state(loop)
        if saved is None:
            self.improved = True
        else:
            # the gain in the mean ELBO (the global latents' term included); its noise from the
            # per-datapoint pairs
            gain = elbo - saved["best_test_elbo"]
            _, stderr = paired_improvement(values, torch.tensor(saved["best_values"]))
            threshold = stderr if self.min_delta is None else self.min_delta
            self.improved = gain > threshold
            saved["last_improvement"] = gain
            saved["last_stderr"] = stderr if math.isfinite(stderr) else None
        if self.improved:
            saved = {
                **(saved or {}),
                "patience": self.patience,
                "min_delta": self.min_delta,
                "best_epoch": loop.epoch,
                "best_test_elbo": elbo,
                "best_values": values.double().tolist(),
                "stopped_epoch": None,
            }
            self.best_state = {
                k: v.detach().cpu().clone() for k, v in loop.model.state_dict().items()
            }
        elif loop.epoch - saved["best_epoch"] >= self.patience:
            saved["stopped_epoch"] = loop.epoch
            loop.stop = True
        loop.history.extra[HISTORY_KEY] = saved


def stopped_epoch(history_extra: dict[str, Any]) -> int | None:
    """The epoch at which early stopping ended a run, from its history; ``None`` if it did not."""
    state = history_extra.get(HISTORY_KEY)
    return None if not isinstance(state, dict) else state.get("stopped_epoch")
