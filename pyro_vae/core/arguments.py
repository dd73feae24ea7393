"""A batch as the arguments of one call of a model and guide: ``(args, kwargs)``, their tensors
and their number of datapoints (the leading size of the first tensor, or the number of sequences
of a :class:`~torch.nn.utils.rnn.PackedSequence`)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.nn.utils.rnn import PackedSequence

from pyro_vae.util.errors import DataError


def leaves(value: Any) -> Iterator[Any]:
    """The tensors (and other values) of a nest of tuples, lists and dicts, in order; a
    :class:`~torch.nn.utils.rnn.PackedSequence` is one leaf."""
    if isinstance(value, dict):
        for item in value.values():
            yield from leaves(item)
    elif isinstance(value, (tuple, list)) and not isinstance(value, PackedSequence):
        for item in value:
            yield from leaves(item)
    else:
        yield value


def batch_length(args: tuple, kwargs: dict) -> int:
    """The number of datapoints of a batch: the leading size of its first tensor."""
    for leaf in leaves((args, kwargs)):
        if isinstance(leaf, PackedSequence):
            return int(leaf.batch_sizes[0])
        if isinstance(leaf, torch.Tensor) and leaf.dim() >= 1:
            return leaf.shape[0]
    raise DataError(
        "a batch holds no tensor with a datapoint dimension, so its number of datapoints is unknown"
    )


def floating_tensors(args: tuple, kwargs: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """``(where, tensor)`` for every floating-point tensor of a batch, ``where`` naming it."""
    named = [(f"argument {i}", value) for i, value in enumerate(args)]
    named += [(f"argument {key!r}", value) for key, value in kwargs.items()]
    for where, value in named:
        for leaf in leaves(value):
            data = leaf.data if isinstance(leaf, PackedSequence) else leaf
            if isinstance(data, torch.Tensor) and data.is_floating_point():
                yield where, data
