"""The training loop: epochs of SVI steps, a held-out score, and hooks. It knows nothing of
files or ranks: the run folder, the progress bar and the plots are :class:`Callback` objects,
and data parallelism wraps its steps and batches (:class:`~pyro_vae.train.parallel.Replicas`).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import pyro
import torch

from pyro_vae.data.batches import Source
from pyro_vae.infer import ELBOEstimator, LinearWarmup
from pyro_vae.runs import History
from pyro_vae.train.parallel import Replicas
from pyro_vae.util.errors import TrainingDiverged

#: the clock of the epochs' times (``time.perf_counter``; a test may replace it)
clock: Callable[[], float] = time.perf_counter


class Callback:
    """A hook with one job; each method is called by :func:`run_epochs` (all optional)."""

    def on_epoch_end(self, loop: Loop) -> None:
        """After an epoch's training and held-out score, ``loop.history`` updated."""

    def on_fit_end(self, loop: Loop) -> None:
        """After the last epoch (not after a failure)."""

    def close(self) -> None:
        """Always, last (release a progress bar, ...)."""


@contextmanager
def _quiet_numerics() -> Iterator[None]:
    """No distribution validation in the hot loop, and no NaN warning (a NaN loss is caught
    at the end of the epoch)."""
    with pyro.validation_enabled(False), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Encountered NaN")
        yield


@dataclass
class Loop:
    """Everything one training run's epochs touch.

    ``step_loss(*args, **kwargs)`` is the summed loss of a batch; ``held_out`` the held-out
    source scored after each epoch with ``eval_elbo`` (``None``: no score).
    """

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    step_loss: Callable[..., torch.Tensor]
    estimator: ELBOEstimator
    warmup: LinearWarmup
    source: Source
    batch_size: int
    generator: torch.Generator
    order_generator: torch.Generator
    eval_elbo: ELBOEstimator
    held_out: Source | None = None
    #: calls of ``eval_elbo`` averaged per held-out batch (more than one when the pair cannot
    #: take a particle dimension and ``eval_elbo`` draws one particle per call)
    eval_repeats: int = 1
    replicas: Replicas = field(default_factory=Replicas)
    history: History = field(default_factory=History)
    epoch: int = 0
    #: set by a callback to end the run after the current epoch (e.g. a time budget)
    stop: bool = False
    #: the mean loss per datapoint of this process's first step (the divergence check's origin)
    initial_loss: float | None = None
    #: ``compiled(args, kwargs, num_data)``: a compiled step used instead of ``step_loss``
    #: (:class:`~pyro_vae.train.compiled.CompiledStep`)
    compiled: Callable[[tuple, dict, int], torch.Tensor] | None = None

    def train_epoch(self) -> float:
        """One pass over the training source; the mean loss per datapoint."""
        self.model.train()
        steps = self.replicas.steps_per_epoch(self.source, self.batch_size)
        loss_sum = torch.zeros((), device=self.generator.device)
        count = 0
        batches = self.replicas.batches(self.source, self.batch_size, self.generator,
                                        self.order_generator)
        with _quiet_numerics():
            for step, batch in enumerate(batches, start=(self.epoch - 1) * steps):
                self.estimator.beta = self.warmup(step)
                size = batch.size
                self.estimator.global_weight = size / self.source.num_data
                if self.compiled is not None:
                    loss = self.compiled(batch.args, batch.kwargs, size)
                else:
                    loss = self.replicas.step(
                        lambda batch=batch: self.step_loss(*batch.args, **batch.kwargs), size,
                        self.optimizer)
                if self.initial_loss is None:  # one synchronisation per run
                    self.initial_loss = self.replicas.mean(loss.detach().clone(), size)
                loss_sum += loss
                count += size
        return self.replicas.mean(loss_sum, count)

    @torch.no_grad()
    def held_out_elbo(self) -> float | None:
        """Estimate of the mean per-datapoint ELBO of the held-out data (nats)."""
        if self.held_out is None:
            return None
        self.model.eval()
        total = 0.0
        with _quiet_numerics():
            for batch in self.replicas.share(self.held_out.ordered(self.batch_size)):
                self.eval_elbo.global_weight = batch.size / self.held_out.num_data
                for _ in range(self.eval_repeats):
                    total -= self.eval_elbo.loss(self.model.model, self.model.guide,
                                                 *batch.args, **batch.kwargs) / self.eval_repeats
        return self.replicas.total(total, self.generator.device) / self.held_out.num_data


#: An epoch whose mean loss rose above the first step's by more than this many times the first
#: step's magnitude (at least 1 nat) has diverged: no working run climbs that far.
DIVERGENCE_RATIO = 1000.0


def diverged(mean_loss: float, initial_loss: float | None) -> bool:
    """Whether an epoch's finite ``mean_loss`` has run away from the first step's loss."""
    if initial_loss is None or not math.isfinite(initial_loss):
        return False
    return mean_loss - initial_loss > DIVERGENCE_RATIO * max(abs(initial_loss), 1.0)


def run_epochs(loop: Loop, last_epoch: int, callbacks: Sequence[Callback] = ()) -> History:
    """Train ``loop`` from the epoch after ``loop.epoch`` up to ``last_epoch``, or until a
    callback sets ``loop.stop``.

    :raises TrainingDiverged: when an epoch's mean loss is NaN or infinite, or has risen by
        more than :data:`DIVERGENCE_RATIO` times the first step's magnitude (after the last
        good epoch's callbacks ran).
    """
    try:
        for epoch in range(loop.epoch + 1, last_epoch + 1):
            start = clock()
            loop.epoch = epoch
            mean_loss = loop.train_epoch()
            if not math.isfinite(mean_loss):
                raise TrainingDiverged(f"the training loss became {mean_loss} in epoch {epoch}")
            if diverged(mean_loss, loop.initial_loss):
                raise TrainingDiverged(
                    f"the training loss rose to {mean_loss:.4g} nats per datapoint in epoch "
                    f"{epoch}, from {loop.initial_loss:.4g} at the first step")
            elbo = loop.held_out_elbo()
            loop.replicas.check_in_sync(loop.model)
            loop.history.append(epoch, mean_loss, elbo, clock() - start)
            for callback in callbacks:
                callback.on_epoch_end(loop)
            if loop.stop:
                break
        for callback in callbacks:
            callback.on_fit_end(loop)
    finally:
        for callback in callbacks:
            callback.close()
    return loop.history
