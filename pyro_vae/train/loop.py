"""The training loop: epochs of SVI steps, a held-out score, and hooks. It knows nothing of
files or ranks: the run folder, the progress bar and the plots are :class:`Callback` objects,
and data parallelism wraps its steps and batches (:class:`~pyro_vae.train.parallel.Replicas`).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import pyro
import torch
from pyro.infer.util import torch_item

from pyro_vae.data.batches import Source
from pyro_vae.infer import ELBOEstimator, LinearWarmup
from pyro_vae.runs import History
from pyro_vae.train.parallel import Replicas
from pyro_vae.util import budget
from pyro_vae.util.errors import TrainingDiverged

#: the clock of the epochs' times (``time.perf_counter``; a test may replace it)
clock: Callable[[], float] = time.perf_counter


class Callback:
    """A hook with one job; each method is called by :func:`run_epochs` (all optional)."""

    def on_fit_start(self, loop: Loop) -> None:
        """Before the first epoch this process trains, ``loop.history`` restored (resumed)."""

    def on_step_end(self, loop: Loop, step: int, loss: torch.Tensor) -> None:
        """After each training step: ``step`` counts the run's steps from 1, ``loss`` is the
        step's mean loss per datapoint of this rank's batch, a tensor on the device (not
        synchronized: read it once per epoch, not per step). Called only for a callback that
        overrides it, so the steps of a run without one pay nothing."""

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
class Step:
    """The model, its estimator and its optimizer: what one SVI step needs.

    ``loss(*args, **kwargs)`` is the summed loss of a batch; ``warmup(step)`` sets the
    estimator's β before each step; ``compiled(args, kwargs, num_data)``, when set, is a
    compiled step used instead of ``loss`` (:class:`~pyro_vae.train.compiled.CompiledStep`).
    """

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loss: Callable[..., torch.Tensor]
    estimator: ELBOEstimator
    warmup: LinearWarmup
    compiled: Callable[[tuple, dict, int], torch.Tensor] | None = None
    #: the gradients' largest total norm (``None``: not clipped)
    clip_norm: float | None = None
    #: the optimizer's learning-rate scheduler, stepped after each epoch (``None``: none)
    scheduler: Any = None


@dataclass
class Batches:
    """The training data: its source, the batch size, the generator of each epoch's draws
    (a dynamic binarization, ...) and the one of its order (the same on every rank)."""

    source: Source
    batch_size: int
    generator: torch.Generator
    order_generator: torch.Generator


@dataclass
class HeldOut:
    """The held-out data scored after each epoch with ``elbo``, averaged over ``repeats`` calls
    per batch (more than one when the pair cannot take a particle dimension and ``elbo`` draws
    one particle per call)."""

    source: Source
    elbo: ELBOEstimator
    repeats: int = 1
    #: also keep each datapoint's ELBO estimate (``Loop.held_out_values``), e.g. for early
    #: stopping's paired comparison of two epochs
    per_datapoint: bool = False


@dataclass
class Loop:
    """Everything one training run's epochs touch: the step, the data, the held-out score
    (``None``: none), the replicas of data parallelism, and the run's state."""

    step: Step
    data: Batches
    held_out: HeldOut | None = None
    replicas: Replicas = field(default_factory=Replicas)
    history: History = field(default_factory=History)
    epoch: int = 0
    #: set by a callback to end the run after the current epoch (e.g. a time budget)
    stop: bool = False
    #: the mean loss per datapoint of this process's first step (the divergence check's origin)
    initial_loss: float | None = None
    #: the last held-out score per datapoint, ``[N]`` in the data's order, on every rank (with
    #: ``HeldOut.per_datapoint``)
    held_out_values: torch.Tensor | None = None

    @property
    def model(self) -> torch.nn.Module:
        return self.step.model

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.step.optimizer

    @property
    def generator(self) -> torch.Generator:
        return self.data.generator

    @property
    def order_generator(self) -> torch.Generator:
        return self.data.order_generator

    def train_epoch(self, hooks: Sequence[Callback] = ()) -> float:
        """One pass over the training source; the mean loss per datapoint. ``hooks`` are
        told of each step (:meth:`Callback.on_step_end`)."""
        step, data = self.step, self.data
        step.model.train()
        steps = self.replicas.steps_per_epoch(data.source, data.batch_size)
        loss_sum = torch.zeros((), device=data.generator.device)
        count = 0
        batches = self.replicas.batches(
            data.source, data.batch_size, data.generator, data.order_generator
        )
        # what each step reads, looked up once per epoch
        estimator, warmup, compiled = step.estimator, step.warmup, step.compiled
        num_data, piece_done = data.source.num_data, budget.piece_done
        with _quiet_numerics():
            for index, batch in enumerate(batches, start=(self.epoch - 1) * steps):
                estimator.beta = warmup(index)
                size = batch.size
                estimator.global_weight = size / num_data
                if compiled is not None:
                    loss = compiled(batch.args, batch.kwargs, size)
                else:
                    loss = self.replicas.step(
                        lambda batch=batch: step.loss(*batch.args, **batch.kwargs),
                        size,
                        step.optimizer,
                        step.clip_norm,
                    )
                if self.initial_loss is None:  # one synchronisation per run
                    self.initial_loss = self.replicas.mean(loss.detach().clone(), size)
                loss_sum += loss
                count += size
                if hooks:
                    mean = loss.detach() / size
                    for hook in hooks:
                        hook.on_step_end(self, index + 1, mean)
                piece_done()
        return self.replicas.mean(loss_sum, count)

    @torch.no_grad()
    def held_out_elbo(self) -> float | None:
        """Estimate of the mean per-datapoint ELBO of the held-out data (nats)."""
        if self.held_out is None:
            return None
        model, held_out = self.step.model, self.held_out
        elbo = held_out.elbo
        model.eval()
        total, parts = 0.0, []
        with _quiet_numerics():
            for batch in self.replicas.share(held_out.source.ordered(self.data.batch_size)):
                elbo.global_weight = batch.size / held_out.source.num_data
                values = 0.0  # the batch's per-datapoint bound, with per_datapoint
                for _ in range(held_out.repeats):
                    if not held_out.per_datapoint:
                        loss = elbo.loss(model.model, model.guide, *batch.args, **batch.kwargs)
                    else:  # the same draws and loss, and the bound of each datapoint
                        particles = elbo.draw(model.model, model.guide, batch.args, batch.kwargs)
                        loss = torch_item(elbo.loss_of(particles, gradient=False))
                        bound = elbo.objective(particles, gradient=False).per_datapoint
                        values = values + bound.mean(0).double().cpu() / held_out.repeats
                    total -= loss / held_out.repeats
                if held_out.per_datapoint:
                    parts.append(values)
        if held_out.per_datapoint:
            self.held_out_values = torch.cat(self.replicas.gather_shared(parts))
        return self.replicas.total(total, self.data.generator.device) / held_out.source.num_data


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
    callback sets ``loop.stop``. Under :func:`pyro_vae.util.budget.time_limit` (one process),
    the steps of all the epochs are one request: a training whose time, estimated from its first
    steps, exceeds the bound is refused then (what runs between epochs is not counted).

    :raises TimeLimitError: see above.
    :raises TrainingDiverged: when an epoch's mean loss is NaN or infinite, or has risen by
        more than :data:`DIVERGENCE_RATIO` times the first step's magnitude (after the last
        good epoch's callbacks ran).
    """
    steps = loop.replicas.steps_per_epoch(loop.data.source, loop.data.batch_size)
    epochs = last_epoch - loop.epoch
    try:
        for callback in callbacks:  # not timed with the steps
            callback.on_fit_start(loop)
        # the ranks would not agree on a refusal timed by each: the bound holds one process
        with (
            nullcontext()
            if loop.replicas.dist.enabled
            else budget.work(
                epochs * steps, f"training {epochs} epoch(s) of {steps} step(s)", "steps"
            )
        ):
            _epochs(loop, last_epoch, callbacks)
        for callback in callbacks:
            callback.on_fit_end(loop)
    finally:
        for callback in callbacks:
            callback.close()
    return loop.history


def _epochs(loop: Loop, last_epoch: int, callbacks: Sequence[Callback]) -> None:
    stepped = [c for c in callbacks if type(c).on_step_end is not Callback.on_step_end]
    for epoch in range(loop.epoch + 1, last_epoch + 1):
        start = clock()
        loop.epoch = epoch
        mean_loss = loop.train_epoch(stepped)
        if not math.isfinite(mean_loss):
            raise TrainingDiverged(f"the training loss became {mean_loss} in epoch {epoch}")
        if diverged(mean_loss, loop.initial_loss):
            raise TrainingDiverged(
                f"the training loss rose to {mean_loss:.4g} nats per datapoint in epoch "
                f"{epoch}, from {loop.initial_loss:.4g} at the first step"
            )
        with budget.aside():
            elbo = loop.held_out_elbo()
            loop.replicas.check_in_sync(loop.model)
            loop.history.append(epoch, mean_loss, elbo, clock() - start)
            for callback in callbacks:
                callback.on_epoch_end(loop)
        if loop.stop:
            break
