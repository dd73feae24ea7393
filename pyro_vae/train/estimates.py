r"""The held-out estimate during training: every ``every`` epochs, and once before the first,
the evaluator's numbers on the held-out data, in the history and so in the loggers.

Each estimate is one entry of ``history.extra["estimates"]`` (saved with every checkpoint):
the epoch (0: before training), K, log p̂_K(x) and its standard error, the ELBO and the gap
log p̂_K − ELBO (with guide sites summed out, the summed bound E log Σ_c w; the ELBO of
Pyro's ``TraceEnum_ELBO`` is then ``trace_enum_elbo``, which is −(R + D)), the mean effective
sample size over K, k-hat (the largest, and the fraction of datapoints above 0.7) where K
allows it, and the rate R = KL(q(z|x) ‖ p(z)) and distortion
D = −E_q log p(x|z) with their standard errors (:func:`~pyro_vae.evaluate.rate_distortion`,
K draws each). Every estimate draws from ``torch.manual_seed(seed)`` on a fork of the random
state: the training is not disturbed, and two epochs' estimates share their random numbers, so
their difference is the weights' (common random numbers), and a resumed run computes the same
numbers as one that was never interrupted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pyro
import torch

from pyro_vae.core.protocol import data_plate_name
from pyro_vae.data.batches import Source
from pyro_vae.evaluate import evaluate_dataset, rate_distortion
from pyro_vae.evaluate.khat import MIN_KHAT_PARTICLES
from pyro_vae.train.loop import Callback, Loop
from pyro_vae.util.distributed import SINGLE, DistributedContext
from pyro_vae.util.rng import forked_rng

#: the history's key of the estimates
KEY = "estimates"
#: an estimate's numbers, as the loggers name them (``test/NAME``)
NAMES = (
    "log_px",
    "log_px_stderr",
    "gap",
    "trace_enum_elbo",
    "ess",
    "khat_max",
    "khat_bad",
    "rate",
    "rate_stderr",
    "distortion",
    "distortion_stderr",
)


def estimate_at(history: Any, epoch: int) -> dict[str, Any] | None:
    """The estimate of ``epoch`` in ``history`` (``None`` where that epoch has none)."""
    for entry in history.extra.get(KEY, ()):
        if entry["epoch"] == epoch:
            return entry
    return None


@dataclass
class HeldOutEstimate(Callback):
    """Estimates ``data`` (held-out) with K = ``particles`` every ``every`` epochs and before
    the first epoch (a run that starts from epoch 0): see the module's docstring. Under several
    ranks the evaluator's batches are shared out (each seeded from ``seed`` and its index);
    the rate and distortion are computed by every rank on all the data (the same numbers)."""

    data: Source
    every: int
    particles: int
    batch_size: int
    seed: int
    dist: DistributedContext = SINGLE

    def on_fit_start(self, loop: Loop) -> None:
        if loop.epoch == 0 and estimate_at(loop.history, 0) is None:
            self.record(loop, 0)  # before any training: a pair it cannot score fails here

    def on_epoch_end(self, loop: Loop) -> None:
        if loop.epoch % self.every == 0:
            self.record(loop, loop.epoch)

    def record(self, loop: Loop, epoch: int) -> None:
        entries = loop.history.extra.setdefault(KEY, [])
        entries[:] = [entry for entry in entries if entry["epoch"] < epoch]
        entries.append({"epoch": epoch, **self.estimate(loop)})

    def estimate(self, loop: Loop) -> dict[str, Any]:
        model, guide = loop.model.model, loop.model.guide
        plate = data_plate_name(loop.model)
        khat = self.particles >= MIN_KHAT_PARTICLES
        with forked_rng(), pyro.validation_enabled(False):
            torch.manual_seed(self.seed)
            result = evaluate_dataset(
                model,
                guide,
                self.data,
                num_particles=self.particles,
                batch_size=self.batch_size,
                khat=khat,
                data_plate=plate,
                batch_seed=self.seed if self.dist.enabled else None,
                dist=self.dist,
            )
        summary = result.summary()
        with pyro.validation_enabled(False):
            rd = rate_distortion(
                model,
                guide,
                self.data,
                num_particles=self.particles,
                batch_size=self.batch_size,
                data_plate=plate,
                seed=self.seed,
            ).summary()
        out: dict[str, Any] = {
            "particles": self.particles,
            "log_px": summary["log_px"]["mean"],
            "log_px_stderr": summary["log_px"]["stderr"],
            "elbo": summary["elbo"]["mean"],
            "gap": summary["gap"]["mean"],
            "ess": summary["ess"]["mean"],
        }
        if khat:
            out["khat_max"] = summary["khat"]["max"]
            out["khat_bad"] = summary["khat"]["fraction_bad"]  # k-hat > 0.7
        if "trace_enum_elbo" in summary:  # elbo is then the summed bound E log Σ_c w
            out["trace_enum_elbo"] = summary["trace_enum_elbo"]["mean"]
        for name in ("rate", "distortion"):
            out[name] = rd[name]["mean"]
            out[f"{name}_stderr"] = rd[name]["stderr"]
        # JSON has no infinities: a number that is not finite (the k-hat of weights that are
        # all equal, a standard error of one datapoint) is recorded as null, not logged
        return {
            k: v if not isinstance(v, float) or math.isfinite(v) else None for k, v in out.items()
        }
