"""Data parallelism as a wrapper around the step and the data, not branches inside the loop.

:class:`Replicas` is what the loop asks for its batches, steps and epoch totals. In a single
process it hands them through; under torchrun (see :doc:`distributed`) it deals every epoch's
permutation out among the ranks (the :class:`~torch.utils.data.DistributedSampler` rule),
averages the gradients before each optimizer step (DistributedDataParallel's reduction), sums
the epoch's loss and datapoints over the ranks, deals the held-out batches round-robin, and
checks after each epoch that every rank holds the same parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from pyro_vae.data.agreement import describe, fingerprint
from pyro_vae.data.batches import Batch, Source
from pyro_vae.runs import rng_state, set_generator_state, set_rng_state
from pyro_vae.train.step import svi_step
from pyro_vae.util.distributed import (
    SINGLE,
    DistributedContext,
    all_gather_objects,
    all_reduce_sum,
    broadcast_tensors,
    check_in_sync,
    check_same_on_every_rank,
)
from pyro_vae.util.errors import CheckpointError


@dataclass(frozen=True)
class Replicas:
    """The ranks of ``dist`` (one process: :data:`~pyro_vae.util.distributed.SINGLE`)."""

    dist: DistributedContext = SINGLE

    def check_same_data(self, train: Source, test: Source | None) -> None:
        """Stop every rank with one line unless all ranks hold data of the same lengths and
        the same shapes per datapoint, and then of the same content
        (:func:`~pyro_vae.data.agreement.fingerprint`; one gather)."""
        if self.dist.enabled:
            check_same_on_every_rank(
                f"training {describe(train)}, test {'none' if test is None else describe(test)}",
                self.dist,
                "data",
                f"training {fingerprint(train)}, test "
                f"{'none' if test is None else fingerprint(test)}",
            )

    def start(self, model: torch.nn.Module) -> None:
        """Give every rank rank 0's initial weights."""
        broadcast_tensors(model.state_dict().values(), self.dist)

    def batches(
        self,
        source: Source,
        batch_size: int,
        generator: torch.Generator,
        order_generator: torch.Generator,
    ) -> Iterator[Batch]:
        return source.epoch(batch_size, generator, order_generator, self.dist)

    def steps_per_epoch(self, source: Source, batch_size: int) -> int:
        return source.steps(batch_size, self.dist)

    def step(
        self,
        loss_fn: Callable[[], torch.Tensor],
        num_data: int,
        optimizer: torch.optim.Optimizer,
        clip_norm: float | None = None,
    ) -> torch.Tensor:
        return svi_step(loss_fn, num_data, optimizer, self.dist, clip_norm)

    def mean(self, total: torch.Tensor, count: int) -> float:
        """``total / count`` summed over the ranks (every rank gets the value)."""
        totals = torch.stack(
            [total.to(torch.float64), total.new_tensor(count, dtype=torch.float64)]
        )
        if self.dist.enabled:
            all_reduce_sum(totals, self.dist, "summing the training loss")
            return totals[0].item() / totals[1].item()
        return total.item() / count

    def share(self, batches: Iterable[Batch]) -> Iterator[Batch]:
        """This rank's held-out batches: r, r + W, r + 2W, ..."""
        for index, batch in enumerate(batches):
            if index % self.dist.world_size == self.dist.rank:
                yield batch

    def gather_shared(self, parts: list[Any]) -> list[Any]:
        """Every rank's ``parts`` of the batches :meth:`share` gave it, on every rank, in the
        batches' order."""
        if not self.dist.enabled:
            return parts
        every = all_gather_objects(parts, self.dist, "gathering the held-out scores")
        world, count = self.dist.world_size, sum(len(p) for p in every)
        return [every[index % world][index // world] for index in range(count)]

    def total(self, value: float, device: torch.device) -> float:
        if not self.dist.enabled:
            return value
        summed = torch.tensor(value, dtype=torch.float64, device=device)
        return all_reduce_sum(summed, self.dist, "summing the test ELBO").item()

    def check_in_sync(self, model: torch.nn.Module) -> None:
        check_in_sync(model.parameters(), self.dist)

    def rng_states(
        self, generator: torch.Generator, order_generator: torch.Generator
    ) -> dict[str, Any] | None:
        """Every rank's random states, gathered on every rank (``None`` in a single process)."""
        if not self.dist.enabled:
            return None
        states = all_gather_objects(rng_state(generator), self.dist, "gathering the random states")
        return {
            "world_size": self.dist.world_size,
            "rng": states,
            "order": order_generator.get_state(),
        }

    def restore_rng_states(
        self,
        state: dict[str, Any],
        generator: torch.Generator,
        order_generator: torch.Generator,
        run_dir: Any,
    ) -> None:
        ranks = state.get("distributed")
        saved_world = ranks["world_size"] if ranks is not None else 1
        if saved_world != self.dist.world_size:
            raise CheckpointError(
                f"{run_dir} was trained by {saved_world} process(es) and this is "
                f"{self.dist.world_size}: resume it with the same number (torchrun "
                f"--nproc-per-node={saved_world} ...), which the data shards and random streams "
                "need to continue exactly"
            )
        if ranks is None:
            set_rng_state(state["rng"], generator)
            return
        set_rng_state(ranks["rng"][self.dist.rank], generator)
        set_generator_state("order", order_generator, ranks["order"])
