"""Data-parallel training and sharded evaluation on :mod:`torch.distributed`, launched by torchrun.

torchrun starts one process per rank and describes the group in the environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``). :func:`init_distributed` joins
that group (``nccl`` on GPUs, ``gloo`` on the CPU); without those variables, or with
``WORLD_SIZE=1``, it joins nothing and returns :data:`SINGLE`, for which every helper here is
the identity, so a single process runs exactly the code it ran before.

The helpers follow :class:`~torch.nn.parallel.DistributedDataParallel`'s semantics without
wrapping the model (a Pyro model/guide pair calls its networks itself, never DDP's ``forward``):
rank 0's weights are broadcast once (:func:`broadcast_tensors`), each rank takes its
:class:`~torch.utils.data.DistributedSampler` share of a permutation all ranks draw alike
(:func:`shard_indices`), gradients are averaged after every backward pass
(:func:`average_gradients`), and :func:`check_in_sync` verifies, bit for bit, that the ranks
still hold the same parameters.

Joining the group and each collective are bounded by a timeout (``--dist-timeout``,
``$PYRO_VAE_DIST_TIMEOUT``, default :data:`DEFAULT_TIMEOUT_S` seconds). A rank that dies or hangs
makes the others fail with a :class:`DistributedError` naming the step that waited, instead of
hanging. A process whose collective failed cannot leave its group safely (gloo's teardown then
aborts the interpreter now and then, with "terminate called without an active exception"), so
:func:`shutdown`, run by the command line and at exit, ends such a process at once with
:data:`EXIT_BROKEN_GROUP` after flushing its output.
"""

from __future__ import annotations

import atexit
import os
import re
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch

from pyro_vae.util.errors import ConfigError, PyroVAEError, shorten

ENV_TIMEOUT = "PYRO_VAE_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0
SEED_BITS = 32
RANK_STREAM = 1
SHARED_ORDER_STREAM = 2
EVAL_BATCH_STREAM = 3
MAX_CAUSE_CHARS = 200
#: The exit status of a process whose process group broke (see :func:`shutdown`).
EXIT_BROKEN_GROUP = 2


class DistributedError(PyroVAEError):
    """A collective failed: another rank died, hangs past the timeout, or disagrees."""

    per_rank = True


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in the group: ``rank`` of ``world_size``, ``local_rank`` on its
    node, and the collective timeout in seconds (``None`` when the group was created elsewhere)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    timeout_s: float | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files and prints."""
        return self.rank == 0


SINGLE = DistributedContext()
_owned_timeout_s: float | None = None
_broken = False


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"${name} must be a whole number, got {raw!r}") from None


def resolve_timeout(timeout_s: float | None = None) -> float:
    """``timeout_s``, else ``$PYRO_VAE_DIST_TIMEOUT``, else :data:`DEFAULT_TIMEOUT_S` (seconds)."""
    if timeout_s is None:
        raw = os.environ.get(ENV_TIMEOUT)
        try:
            timeout_s = DEFAULT_TIMEOUT_S if raw in (None, "") else float(raw)
        except ValueError:
            raise ConfigError(f"${ENV_TIMEOUT} must be a number of seconds, got {raw!r}") from None
    if not timeout_s > 0:
        raise ConfigError(f"the distributed timeout must be > 0 seconds, got {timeout_s}")
    return float(timeout_s)


def current_context() -> DistributedContext:
    """The context of the process group already joined, or :data:`SINGLE`."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return SINGLE
    return DistributedContext(
        torch.distributed.get_rank(),
        torch.distributed.get_world_size(),
        _env_int("LOCAL_RANK", 0),
        _owned_timeout_s,
    )


def check_gpus_per_node(local_rank: int) -> None:
    """Raise :class:`~pyro_vae.util.errors.ConfigError` unless this node has a CUDA GPU for each
    of its processes: NCCL gives every process a GPU of its own (``cuda:LOCAL_RANK``), and two ranks
    cannot share one. The processes on the node are torchrun's ``LOCAL_WORLD_SIZE`` (else
    ``local_rank + 1``), so every process of the node fails alike, including those whose own
    GPU exists, rather than some of them waiting for the others until the timeout."""
    processes = max(_env_int("LOCAL_WORLD_SIZE", local_rank + 1), local_rank + 1)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if processes <= gpus:
        return
    have = f"{gpus} CUDA GPU{'' if gpus == 1 else 's'}" if gpus else "no CUDA GPU"
    fix = f"start at most {gpus} per node (torchrun --nproc-per-node={gpus}) or " if gpus else ""
    raise ConfigError(
        f'{processes} processes on this node but {have}: on CUDA (device="cuda", '
        f'or device="auto" with a GPU present) each process needs a GPU of its '
        f'own; {fix}train on the CPU with device="cpu"'
    )


def init_distributed(
    device: torch.device | str = "cpu", timeout_s: float | None = None
) -> DistributedContext:
    """Join the process group described by torchrun's environment variables.

    Returns :data:`SINGLE` when ``WORLD_SIZE`` is unset or 1, and the existing group's context
    when one is already initialized (so calling it twice, or from code run under a group set up
    by the caller, is harmless). The backend is ``nccl`` for a CUDA ``device`` (each rank then
    uses GPU ``LOCAL_RANK``) and ``gloo`` otherwise. A CUDA ``device`` with fewer visible GPUs
    than processes on the node is a :class:`~pyro_vae.util.errors.ConfigError`, raised on every rank
    of the node before any of them joins the group (see :func:`check_gpus_per_node`).
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return current_context()
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size <= 1:
        return SINGLE
    if not torch.distributed.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    global _owned_timeout_s
    timeout = resolve_timeout(timeout_s)
    context = DistributedContext(
        _env_int("RANK", 0), world_size, _env_int("LOCAL_RANK", 0), timeout
    )
    options: dict[str, Any] = {"backend": "gloo"}
    if torch.device(device).type == "cuda":
        check_gpus_per_node(context.local_rank)
        gpu = torch.device("cuda", context.local_rank)
        torch.cuda.set_device(gpu)
        options = {"backend": "nccl", "device_id": gpu}
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    try:
        with _collective(context, "joining the process group"):
            torch.distributed.init_process_group(
                timeout=timedelta(seconds=timeout),
                rank=context.rank,
                world_size=world_size,
                **options,
            )
    except ValueError as exc:  # the env:// rendezvous without its address (no torchrun)
        if not missing or not any(name in str(exc) for name in missing):
            raise
        raise ConfigError(
            f"WORLD_SIZE is {world_size} but {' and '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not set: launch the ranks "
            "with torchrun (which sets them), or unset WORLD_SIZE to run one "
            "process"
        ) from None
    _owned_timeout_s = timeout
    atexit.register(shutdown)
    return context


def _exit_now(status: int) -> None:
    """Flush stdout and stderr, then end the process without tearing anything down."""
    for stream in (sys.stdout, sys.stderr):
        with suppress(AttributeError, OSError, ValueError):  # a closed or replaced stream
            stream.flush()
    os._exit(status)


def shutdown(status: int | None = None) -> None:
    """Leave the process group if :func:`init_distributed` created it; also run at exit.

    After a collective of that group failed, or the ranks were found to disagree (every rank
    stops, and one may leave while another's gloo threads still talk to it), neither leaving the
    group nor letting the interpreter tear it down is safe: gloo's threads may abort the
    process ("terminate called without an active exception", SIGABRT) depending on their
    timing. This function then flushes stdout and stderr and ends the process at once with
    :data:`EXIT_BROKEN_GROUP` (:func:`os._exit`), whatever exit status was on its way, so a
    failed rank always exits the same way.

    Tearing the group down at a normal end races the same way, now and then, so a caller that
    knows the process's exit ``status`` (the command line) has it end here too: after a barrier
    when ``status`` is 0 (every rank has finished its collectives; bounded by the group's
    timeout, and a rank that already left only ends the wait), then at once with ``status``.
    Without ``status`` (at exit, under a user's own script) the group is destroyed as usual.
    A group created by the caller is left alone.
    """
    global _owned_timeout_s
    if _owned_timeout_s is not None and _broken:
        _exit_now(EXIT_BROKEN_GROUP)
    if _owned_timeout_s is not None and torch.distributed.is_initialized():
        if status is None:
            torch.distributed.destroy_process_group()
        else:
            if status == 0:
                with suppress(DistributedError):
                    barrier(current_context(), "waiting for the other ranks to finish")
            _exit_now(status)
    _owned_timeout_s = None


@contextmanager
def _collective(context: DistributedContext, what: str) -> Iterator[None]:
    """Turn a failed or timed-out collective into one clear :class:`DistributedError` line, and
    mark the group as broken for :func:`shutdown`."""
    global _broken
    try:
        yield
    except RuntimeError as exc:
        if _owned_timeout_s is not None:
            _broken = True
        lines = str(exc).strip().splitlines()
        cause = re.sub(r"^\[[^\]]*\]\s*", "", lines[0] if lines else type(exc).__name__)
        cause = shorten(cause, MAX_CAUSE_CHARS)
        limit = f"{context.timeout_s:g} s" if context.timeout_s is not None else "the timeout"
        raise DistributedError(
            f"rank {context.rank} of {context.world_size}: {what} failed: another rank died or "
            f"gave no answer within {limit} ({cause}). Check the other ranks' output; a slow "
            f"step needs a longer dist_timeout=SECONDS or ${ENV_TIMEOUT}."
        ) from None


def derive_seed(seed: int, *keys: int) -> int:
    """A 32-bit seed for the stream named by ``keys``, mixed from ``seed`` by NumPy's
    :class:`~numpy.random.SeedSequence` (distinct keys give unrelated streams)."""
    entropy = [seed % 2**64, *keys]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint32)[0])


def rank_seed(seed: int, rank: int) -> int:
    """The seed of a rank's own noise: ``seed`` itself on rank 0, a derived one elsewhere."""
    return seed if rank == 0 else derive_seed(seed, RANK_STREAM, rank)


def shard_indices(order: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """This rank's share of ``order``, dealt as :class:`~torch.utils.data.DistributedSampler`
    (``drop_last=False``) deals indices: ``order`` is padded with its own first entries to a
    multiple of the world size, then rank r takes entries r, r + W, r + 2W, ... Every rank gets
    ``ceil(N / W)`` indices, so every rank runs the same number of steps."""
    if not context.enabled:
        return order
    per_rank = -(-order.shape[0] // context.world_size)
    total = per_rank * context.world_size
    padded = order.repeat(-(-total // order.shape[0]))[:total]
    return padded[context.rank :: context.world_size]


def all_reduce_sum(tensor: torch.Tensor, context: DistributedContext, what: str) -> torch.Tensor:
    """Sum ``tensor`` over the ranks, in place; returns it."""
    if context.enabled:
        with _collective(context, what):
            torch.distributed.all_reduce(tensor)
    return tensor


def broadcast_tensors(
    tensors: Iterable[torch.Tensor],
    context: DistributedContext,
    what: str = "broadcasting rank 0's weights",
) -> None:
    """Overwrite ``tensors`` with rank 0's, in place (what DDP does to a model at construction)."""
    if not context.enabled:
        return
    with _collective(context, what), torch.no_grad():
        for tensor in tensors:
            torch.distributed.broadcast(tensor, src=0)


def average_gradients(parameters: Iterable[torch.Tensor], context: DistributedContext) -> None:
    """Replace every gradient by its mean over the ranks, in one flattened all-reduce.

    This is DDP's reduction: with the loss of each rank's batch divided by that batch's size and
    equal batch sizes on every rank, the result is the gradient of the mean loss over the
    combined batch. Parameters without a gradient are skipped; the set must be the same on every
    rank (as DDP assumes without ``find_unused_parameters``).
    """
    if not context.enabled:
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    all_reduce_sum(flat, context, "averaging gradients")
    flat /= context.world_size
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()


def check_in_sync(tensors: Iterable[torch.Tensor], context: DistributedContext) -> None:
    """Raise :class:`DistributedError` on every rank unless all ranks hold bit-identical
    ``tensors``: rank 0's copy is broadcast and compared bit for bit, and the verdict is
    all-reduced so that the ranks fail (or pass) together."""
    tensors = list(tensors)
    if not context.enabled or not tensors:
        return
    with torch.no_grad():
        local = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])
        reference = local.clone()
        broadcast_tensors([reference], context, "checking that the ranks' weights agree")
        differs = (local.view(torch.int64) != reference.view(torch.int64)).sum()
        all_reduce_sum(differs, context, "checking that the ranks' weights agree")
    count = int(differs.item())
    if count:
        global _broken
        _broken = True  # every rank stops here: none may wait on the others while leaving
        values = "1 value differs" if count == 1 else f"{count} values differ"
        raise DistributedError(
            f"rank {context.rank} of {context.world_size}: the ranks' "
            f"parameters have drifted apart ({values} from rank 0's, counted "
            "over all ranks); the gradient reduction is broken"
        )


def all_gather_objects(obj: Any, context: DistributedContext, what: str) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if not context.enabled:
        return [obj]
    gathered: list[Any] = [None] * context.world_size
    with _collective(context, what):
        torch.distributed.all_gather_object(gathered, obj)
    return gathered


def check_same_on_every_rank(
    value: Any, context: DistributedContext, what: str, content: Any = None
) -> None:
    """Raise :class:`DistributedError` on every rank, with the same message, unless every
    rank's ``value`` (picklable, with a readable ``str``) equals rank 0's, and then its
    ``content`` too (a fingerprint of what ``value`` sizes): one gather, before the ranks rely
    on it (training on data of different sizes would deadlock or abort, on data of different
    content it would mix them)."""
    pairs = all_gather_objects((value, content), context, f"comparing the ranks' {what}")
    for index, kind in ((0, ""), (1, " content")):
        values = [pair[index] for pair in pairs]
        if all(other == values[0] for other in values):
            continue
        differ = "; ".join(f"rank {rank}: {other}" for rank, other in enumerate(values))
        raise DistributedError(
            f"the ranks were given different {what}{kind} ({differ}): every rank must load "
            "the same data"
        )


def barrier(context: DistributedContext, what: str) -> None:
    """Wait until every rank gets here."""
    if context.enabled:
        nccl = torch.distributed.get_backend() == "nccl"
        with _collective(context, what):
            torch.distributed.barrier(device_ids=[torch.cuda.current_device()] if nccl else None)


@contextmanager
def main_first(context: DistributedContext, what: str, enabled: bool = True) -> Iterator[None]:
    """Run the block on rank 0 first and on the other ranks once rank 0 has left it (a download
    into a shared folder: the others then find the files in place). The other ranks wait up to
    the collective timeout; if rank 0 fails inside the block they fail too, with
    :class:`DistributedError`. With ``enabled=False`` the block runs everywhere at once."""
    if not (context.enabled and enabled):
        yield
        return
    if not context.is_main:
        barrier(context, what)
    yield
    if context.is_main:
        barrier(context, what)
