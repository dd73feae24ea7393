"""Per-epoch hooks with one job each: progress bar, run folder, a user's function, the final
importance-weighted estimate and the plots."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyro
import torch

from pyro_vae.core.protocol import data_plate_name
from pyro_vae.data.batches import Source
from pyro_vae.runs import save_checkpoint, write_history
from pyro_vae.runs.config import TrainConfig
from pyro_vae.train.early_stopping import EarlyStopping
from pyro_vae.train.estimates import estimate_at
from pyro_vae.train.loop import Callback, Loop
from pyro_vae.util.distributed import SINGLE, DistributedContext
from pyro_vae.util.rng import forked_rng


class ProgressBar(Callback):
    """A tqdm bar over the epochs with the last loss and held-out ELBO (and log p̂_K after an
    epoch with a held-out estimate)."""

    def __init__(self, first_epoch: int, epochs: int, enabled: bool = True) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=epochs, initial=first_epoch - 1, desc="train", unit="epoch", disable=not enabled
        )

    def on_epoch_end(self, loop: Loop) -> None:
        history = loop.history
        postfix = {"loss": f"{history.train_loss[-1]:.2f}"}
        if len(history.test_elbo) == len(history.epoch):
            postfix["test_elbo"] = f"{history.test_elbo[-1]:.2f}"
        estimate = estimate_at(history, loop.epoch)
        if estimate is not None:
            postfix["test_log_px"] = f"{estimate['log_px']:.2f}"
        self.bar.update(1)
        self.bar.set_postfix(postfix)

    def close(self) -> None:
        self.bar.close()


@dataclass
class Checkpoint(Callback):
    """After each epoch: the run folder's checkpoint, weights, history and config (written by
    rank 0; every rank's random states are gathered into it)."""

    run_dir: Path
    config: TrainConfig
    is_main: bool = True
    #: whose best weights are written with the set, in an epoch that became the best
    early_stopping: EarlyStopping | None = None
    #: the learning-rate scheduler whose state is saved with the set
    scheduler: Any = None

    def on_epoch_end(self, loop: Loop) -> None:
        ranks = loop.replicas.rng_states(loop.generator, loop.order_generator)
        stopping = self.early_stopping
        best = stopping.best_state if stopping is not None and stopping.improved else None
        if self.is_main:
            save_checkpoint(
                self.run_dir,
                loop.model,
                loop.optimizer,
                loop.generator,
                loop.history,
                self.config,
                ranks,
                best,
                None if self.scheduler is None else self.scheduler.state_dict(),
            )


@dataclass
class LearningRateSchedule(Callback):
    """After each epoch: the epoch's learning rate recorded in the history (``extra["lr"]``),
    then a step of the ``scheduler``; ``ReduceLROnPlateau`` steps on the held-out −ELBO (the
    training loss without held-out data). Runs before the checkpoint, which saves its state."""

    scheduler: Any

    def on_epoch_end(self, loop: Loop) -> None:
        history = loop.history
        history.extra.setdefault("lr", []).append(loop.optimizer.param_groups[0]["lr"])
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            held_out = len(history.test_elbo) == len(history.epoch)
            self.scheduler.step(-history.test_elbo[-1] if held_out else history.train_loss[-1])
        else:
            self.scheduler.step()


@dataclass
class EpochFunction(Callback):
    """``fn(epoch, history)`` after each epoch (after the checkpoint)."""

    fn: Callable[[int, Any], None]

    def on_epoch_end(self, loop: Loop) -> None:
        self.fn(loop.epoch, loop.history)


@dataclass
class FinalEstimate(Callback):
    """At the end: the held-out log p̂_K(x) and ELBO with K = ``particles`` and their standard
    errors, in ``history.extra["final"]``; computed on a fork of the random state (seeded with
    ``seed``) so training is not disturbed. Under several ranks the batches are shared out,
    each seeded from ``seed`` and its index (see :func:`~pyro_vae.evaluate.evaluate_dataset`)."""

    data: Source
    particles: int
    batch_size: int
    seed: int
    dist: DistributedContext = SINGLE

    def on_fit_end(self, loop: Loop) -> None:
        from pyro_vae.evaluate import evaluate_dataset

        if not loop.history.epoch:
            return
        with forked_rng(), pyro.validation_enabled(False):
            torch.manual_seed(self.seed)
            summary = evaluate_dataset(
                loop.model.model,
                loop.model.guide,
                self.data,
                num_particles=self.particles,
                batch_size=self.batch_size,
                khat=False,
                data_plate=data_plate_name(loop.model),
                batch_seed=self.seed if self.dist.enabled else None,
                dist=self.dist,
            ).summary()
        loop.history.extra["final"] = {
            "particles": self.particles,
            "test_log_px": summary["log_px"]["mean"],
            "test_log_px_stderr": summary["log_px"]["stderr"],
            "test_elbo": summary["elbo"]["mean"],
            "test_gap": summary["gap"]["mean"],
        }
        if "trace_enum_elbo" in summary:  # test_elbo is then the summed bound E log Σ_c w
            loop.history.extra["final"]["test_trace_enum_elbo"] = summary["trace_enum_elbo"]["mean"]


@dataclass
class RunFolderPlots(Callback):
    """At the end: the PNG plots (samples, reconstructions and latent space where the pair
    offers ``sample``, ``encode`` and ``reconstruct`` and the data are the built-in images; the
    training curves always), then the final history, marked as finished."""

    run_dir: Path
    plot: Callable[[Loop], None] = field(default=lambda loop: None)

    def on_fit_end(self, loop: Loop) -> None:
        self.plot(loop)
        write_history(self.run_dir, loop.history, finished=True)  # last: the run is complete
