"""Data in the forms a user has, turned into batches of model/guide arguments.

A *batch* is what one call of ``model(*args, **kwargs)`` and ``guide(*args, **kwargs)`` takes.
:func:`as_source` accepts

- a tensor or NumPy array: one positional argument;
- a tuple or list of tensors/arrays: positional arguments;
- a dict of tensors/arrays: keyword arguments (names matching the pair's arguments);

all sliced together along their first dimension (the datapoints), or

- a map-style :class:`torch.utils.data.Dataset`, whose items are collated by ``collate_fn``
  (torch's ``default_collate`` unless given): an item ``(x, y)`` gives positional arguments,
  an item ``{"x": ..., "mask": ...}`` keyword arguments;
- a :class:`torch.utils.data.DataLoader`: its dataset, batch size, ``collate_fn``, workers and
  ``drop_last`` are kept; the training order is the engine's (seeded, resumable, shardable)
  when the loader shuffles (a ``RandomSampler``), the loader's own order when it does not.
  A loader with a custom sampler or batch sampler is used as it is (one process only).

The number of datapoints in a batch is the first dimension of its first tensor (for a
:class:`~torch.nn.utils.rnn.PackedSequence`, its number of sequences): the engine divides each
batch's summed loss by it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.nn.utils.rnn import PackedSequence
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    Subset,
    default_collate,
)

from pyro_vae.core.arguments import batch_length
from pyro_vae.util.distributed import SINGLE, DistributedContext, shard_indices
from pyro_vae.util.errors import ConfigError, DataError
from pyro_vae.util.usercode import defined_at

LOADER_OPTIONS = (
    "num_workers",
    "pin_memory",
    "timeout",
    "worker_init_fn",
    "multiprocessing_context",
    "persistent_workers",
)


def resolve_device(name: str) -> torch.device:
    """``"auto"`` is CUDA when available, else CPU; ``"cuda"`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError('device="cuda" was requested but no CUDA GPU is available')
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def to_device(value: Any, device: torch.device | None, dtype: torch.dtype | None = None) -> Any:
    """``value`` with every tensor moved to ``device``; floating-point tensors (and packed
    sequences' data) are also cast to ``dtype`` when given. Tuples, lists and dicts are walked;
    anything else is returned as it is."""
    if isinstance(value, PackedSequence):
        data = value.data.to(device=device, dtype=dtype if value.data.is_floating_point() else None)
        return value._replace(data=data)
    if isinstance(value, torch.Tensor):
        cast = dtype if value.is_floating_point() else None
        return value.to(device=device, dtype=cast)
    if isinstance(value, dict):
        return {key: to_device(item, device, dtype) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(item, device, dtype) for item in value)
    return value


@dataclass(frozen=True)
class Batch:
    """One call's arguments and its number of datapoints."""

    args: tuple
    kwargs: dict = field(default_factory=dict)
    #: the number of datapoints when the source knows it (else read from the tensors)
    count: int | None = field(default=None, compare=False, repr=False)

    @property
    def size(self) -> int:
        return self.count if self.count is not None else batch_length(self.args, self.kwargs)

    @classmethod
    def of(cls, collated: Any) -> Batch:
        """A collated batch as arguments: a dict gives keyword arguments, a tuple or list
        positional ones, anything else one positional argument."""
        if isinstance(collated, dict):
            return cls((), dict(collated))
        if isinstance(collated, (tuple, list)) and not isinstance(collated, PackedSequence):
            return cls(tuple(collated))
        return cls((collated,))


def _as_tensor(value: Any, where: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    array = np.asarray(value)
    if array.dtype == object or array.dtype.kind in "USV":
        raise DataError(f"{where} is not numeric (NumPy dtype {array.dtype})")
    return torch.as_tensor(array)


class TensorSource:
    """Tensors held in memory (a tuple: positional arguments, a dict: keyword arguments), all
    with the same number of rows. ``transform(tensors, generator)``, when given, makes each
    training epoch's tensors (e.g. a fresh binarization) from the stored ones."""

    def __init__(self, tensors: tuple | dict, transform: Callable | None = None) -> None:
        values = list(tensors.values()) if isinstance(tensors, dict) else list(tensors)
        if not values:
            raise DataError("the data hold no arrays")
        lengths = [t.shape[0] if t.dim() else 0 for t in values]
        if lengths[0] == 0:
            raise DataError(
                "the data must hold at least one datapoint (a first dimension of size >= 1)"
            )
        if len(set(lengths)) != 1:
            raise DataError(
                f"the arrays of the data have different lengths {lengths}: they are "
                "sliced together along their first dimension"
            )
        self.tensors, self.transform, self.num_data = tensors, transform, lengths[0]

    def _map(self, fn: Callable, tensors: tuple | dict | None = None) -> tuple | dict:
        tensors = self.tensors if tensors is None else tensors
        if isinstance(tensors, dict):
            return {key: fn(value) for key, value in tensors.items()}
        return tuple(fn(value) for value in tensors)

    def _batch(self, tensors: tuple | dict, count: int | None = None) -> Batch:
        return Batch((), tensors, count) if isinstance(tensors, dict) else Batch(tensors, {}, count)

    def to(self, device: torch.device | None, dtype: torch.dtype | None = None) -> TensorSource:
        return TensorSource(self._map(lambda t: to_device(t, device, dtype)), self.transform)

    def head(self, limit: int | None) -> TensorSource:
        """The first ``limit`` datapoints (all of them for ``None``)."""
        if limit is None:
            return self
        return TensorSource(self._map(lambda t: t[:limit]), self.transform)

    def steps(self, batch_size: int, dist: DistributedContext = SINGLE) -> int:
        per_rank = -(-self.num_data // dist.world_size)
        return -(-per_rank // batch_size)

    def epoch(
        self,
        batch_size: int,
        generator: torch.Generator,
        order_generator: torch.Generator,
        dist: DistributedContext = SINGLE,
    ) -> Iterator[Batch]:
        """One training epoch: a permutation from ``order_generator`` (shared by the ranks),
        this rank's share of it, then ``transform`` of those rows with ``generator``. In one
        process a batch that holds the whole data set keeps the data's order: the loss does
        not depend on it, and a guide with a parameter per datapoint (Pyro's sparse gamma
        DEF) indexes its parameters by the row's place in the batch."""
        device = order_generator.device
        if dist.enabled:  # this rank's share alone is transformed; the order has its own stream
            shard = shard_indices(
                torch.randperm(self.num_data, device=device, generator=order_generator), dist
            )
            tensors = self._map(lambda t: t[shard])
            if self.transform is not None:
                tensors = self.transform(tensors, generator)
            order = torch.arange(shard.shape[0], device=device)
        else:
            tensors = (
                self.tensors if self.transform is None else self.transform(self.tensors, generator)
            )
            order = (
                torch.arange(self.num_data, device=device)
                if batch_size >= self.num_data
                else torch.randperm(self.num_data, device=device, generator=order_generator)
            )
        # the rows of each batch by index_select, which equals t[index] in fewer operations
        for index in order.split(batch_size):
            rows = self._map(lambda t, index=index: t.index_select(0, index), tensors)
            yield self._batch(rows, index.shape[0])

    def ordered(self, batch_size: int) -> Iterator[Batch]:
        """Every datapoint once, in order, untransformed: for evaluation."""
        for begin in range(0, self.num_data, batch_size):
            yield self._batch(self._map(lambda t, begin=begin: t[begin : begin + batch_size]))


class LoaderSource:
    """A map-style dataset collated into batches by a :class:`DataLoader` that this source
    builds (so the order can be seeded, resumed and sharded); or, with ``as_is``, a user's
    loader iterated as it is."""

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int | None = None,
        collate_fn: Callable | None = None,
        shuffle: bool = True,
        drop_last: bool = False,
        options: dict | None = None,
        as_is: DataLoader | None = None,
    ) -> None:
        if isinstance(dataset, IterableDataset):
            raise DataError(
                "an IterableDataset has no length or index: give a map-style "
                "Dataset (with __len__ and __getitem__)"
            )
        self.num_data = _length(dataset)
        if self.num_data == 0:
            raise DataError("the dataset is empty")
        self.dataset, self.batch_size, self.shuffle = dataset, batch_size, shuffle
        self.collate_fn = collate_fn or default_collate
        self.drop_last, self.options, self.as_is = drop_last, dict(options or {}), as_is
        self.device: torch.device | None = None
        self.dtype: torch.dtype | None = None

    def to(self, device: torch.device | None, dtype: torch.dtype | None = None) -> LoaderSource:
        out = LoaderSource(
            self.dataset,
            self.batch_size,
            self.collate_fn,
            self.shuffle,
            self.drop_last,
            self.options,
            self.as_is,
        )
        out.device, out.dtype = device, dtype
        return out

    def head(self, limit: int | None) -> LoaderSource:
        """The first ``limit`` datapoints (all of them for ``None``)."""
        if limit is None or limit >= self.num_data:
            return self
        out = LoaderSource(
            Subset(self.dataset, range(limit)),
            self.batch_size,
            self.collate_fn,
            self.shuffle,
            self.drop_last,
            self.options,
        )
        out.device, out.dtype = self.device, self.dtype
        return out

    def _size(self, batch_size: int) -> int:
        return self.batch_size or batch_size

    def _chunks(self, indices: torch.Tensor, batch_size: int) -> list[list[int]]:
        rows = indices.tolist()
        size = self._size(batch_size)
        chunks = [rows[i : i + size] for i in range(0, len(rows), size)]
        if self.drop_last and chunks and len(chunks[-1]) < size:
            chunks.pop()
        return chunks

    def _iterate(self, loader: DataLoader) -> Iterator[Batch]:
        from pyro_vae.util.usercode import first_line, user_frame

        batches = iter(loader)
        while True:
            try:
                collated = next(batches)
            except StopIteration:
                return
            except (RuntimeError, TypeError, ValueError) as exc:
                if user_frame(exc.__traceback__) is not None:
                    raise  # the user's __getitem__ or collate_fn: named where it failed
                raise DataError(
                    f"cannot collate a batch of the {type(self.dataset).__name__}: "
                    f"{first_line(exc)}"
                ) from None
            yield Batch.of(to_device(collated, self.device, self.dtype))

    def steps(self, batch_size: int, dist: DistributedContext = SINGLE) -> int:
        if self.as_is is not None:
            return len(self.as_is)
        per_rank = -(-self.num_data // dist.world_size)
        size = self._size(batch_size)
        return per_rank // size if self.drop_last else -(-per_rank // size)

    def epoch(
        self,
        batch_size: int,
        generator: torch.Generator,
        order_generator: torch.Generator,
        dist: DistributedContext = SINGLE,
    ) -> Iterator[Batch]:
        if self.as_is is not None:
            if dist.enabled:
                raise ConfigError(
                    "a DataLoader with its own sampler cannot be sharded among "
                    "ranks: give its Dataset (and collate_fn) instead"
                )
            yield from self._iterate(self.as_is)
            return
        order = (
            torch.randperm(self.num_data, device=order_generator.device, generator=order_generator)
            if self.shuffle
            else torch.arange(self.num_data)
        )
        shard = shard_indices(order.cpu(), dist)
        loader = DataLoader(
            self.dataset,
            batch_sampler=self._chunks(shard, batch_size),
            collate_fn=self.collate_fn,
            **self.options,
        )
        yield from self._iterate(loader)

    def ordered(self, batch_size: int) -> Iterator[Batch]:
        if self.as_is is not None and not isinstance(
            self.as_is.sampler, (RandomSampler, SequentialSampler)
        ):
            yield from self._iterate(self.as_is)
            return
        chunks = self._chunks(torch.arange(self.num_data), batch_size)
        if self.drop_last:  # evaluation scores every datapoint
            size = self._size(batch_size)
            chunks = [
                list(range(i, min(i + size, self.num_data))) for i in range(0, self.num_data, size)
            ]
        loader = DataLoader(
            self.dataset, batch_sampler=chunks, collate_fn=self.collate_fn, **self.options
        )
        yield from self._iterate(loader)


def _length(dataset: Dataset) -> int:
    """What ``dataset.__len__()`` returns, refused (naming the method's file and line) unless
    a whole number of datapoints, as ``len`` would refuse it."""
    what = type(dataset).__name__
    method = getattr(type(dataset), "__len__", None)
    if method is None:
        raise DataError(f"{what} has no __len__: the engine needs a map-style Dataset")
    length = dataset.__len__()
    if not isinstance(length, bool) and hasattr(type(length), "__index__") and length >= 0:
        return int(length)
    raise DataError(
        f"{defined_at(method)}{what}.__len__ returned {length!r}: the length of a Dataset is "
        "its number of datapoints, an integer >= 0"
    )


def _from_loader(loader: DataLoader) -> LoaderSource:
    options = {name: getattr(loader, name) for name in LOADER_OPTIONS if hasattr(loader, name)}
    if not options.get("num_workers"):
        options = {"pin_memory": options.get("pin_memory", False)}
    standard = (
        isinstance(loader.batch_sampler, BatchSampler)
        and type(loader.batch_sampler) is BatchSampler
        and type(loader.sampler) in (RandomSampler, SequentialSampler)
    )
    if isinstance(loader.dataset, IterableDataset):
        raise DataError(
            "a DataLoader over an IterableDataset has no length or index: give a "
            "map-style Dataset (with __len__ and __getitem__)"
        )
    if not standard:
        return LoaderSource(
            loader.dataset, loader.batch_size, loader.collate_fn, as_is=loader, options=options
        )
    return LoaderSource(
        loader.dataset,
        loader.batch_size,
        loader.collate_fn,
        shuffle=type(loader.sampler) is RandomSampler,
        drop_last=loader.drop_last,
        options=options,
    )


Source = TensorSource | LoaderSource


def as_source(data: Any, collate_fn: Callable | None = None) -> Source:
    """``data`` in any of the module's forms as a source of batches (see the module docstring).

    :raises DataError: for data of another kind, arrays of different lengths, or no datapoint.
    """
    if isinstance(data, (TensorSource, LoaderSource)):
        return data
    if isinstance(data, DataLoader):
        if collate_fn is not None:
            raise ConfigError("collate_fn is given twice: the DataLoader has its own")
        return _from_loader(data)
    if isinstance(data, Dataset):
        return LoaderSource(data, collate_fn=collate_fn)
    if collate_fn is not None:
        raise ConfigError("collate_fn applies to a Dataset; tensors and arrays are sliced")
    if isinstance(data, dict):
        bad = [key for key in data if not isinstance(key, str) or not key.isidentifier()]
        if bad:
            raise DataError(f"the keys {bad} of the data are not argument names")
        return TensorSource(
            {key: _as_tensor(value, f"data[{key!r}]") for key, value in data.items()}
        )
    if isinstance(data, (tuple, list)):
        return TensorSource(tuple(_as_tensor(value, f"data[{i}]") for i, value in enumerate(data)))
    if isinstance(data, (torch.Tensor, np.ndarray)):
        return TensorSource((_as_tensor(data, "data"),))
    raise DataError(
        f"cannot train or evaluate on a {type(data).__name__}: give a tensor or "
        "array, a tuple/list or dict of them, a map-style Dataset or a DataLoader"
    )
