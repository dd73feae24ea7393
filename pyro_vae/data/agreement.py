"""What every rank of a sharded computation must agree on about its data: a source's length
and shapes in words (:func:`describe`), and a fingerprint of its values (:func:`fingerprint`)."""

from __future__ import annotations

import torch

from pyro_vae.core.arguments import leaves
from pyro_vae.data.batches import Source, TensorSource


def describe(source: Source) -> str:
    """``"N datapoints of [shape], ..."``: a source's length and the shapes of its first
    datapoint's tensors (what every rank of a sharded computation must agree on)."""
    first = next(iter(source.ordered(1)))
    shapes = [
        list(leaf.shape[1:])
        for leaf in leaves((first.args, first.kwargs))
        if isinstance(leaf, torch.Tensor)
    ]
    return f"{source.num_data} datapoints of {', '.join(map(str, shapes)) or 'no tensors'}"


#: datapoints converted to float64 at a time by :func:`fingerprint`
CHUNK_ROWS = 65536


def fingerprint(source: Source) -> str:
    """``"sums a/b/c"``: Σx, Σx² and Σ (i + 1)·x_i / N over the datapoints i of the tensors, in
    float64: of all the data of a :class:`TensorSource` (as stored, before a per-epoch
    transform), of the first datapoint of a Dataset's (its others are not loaded). Two ranks'
    copies of the same data give the same sums; other values (another seed, another file) or
    the same rows in another order give others."""
    if isinstance(source, TensorSource):
        tensors = leaves(source.tensors)
    else:
        first = next(iter(source.ordered(1)))
        tensors = leaves((first.args, first.kwargs))
    sums = torch.zeros(3, dtype=torch.float64)
    for t in (t for t in tensors if isinstance(t, torch.Tensor) and t.dim() and t.numel()):
        t = torch.view_as_real(t) if t.is_complex() else t
        for begin in range(0, t.shape[0], CHUNK_ROWS):  # float64 copies of bounded size
            rows = t[begin : begin + CHUNK_ROWS].double()
            rows = rows.reshape(rows.shape[0], -1)
            weights = torch.arange(begin + 1, begin + rows.shape[0] + 1, device=rows.device)
            sums += torch.stack(
                [rows.sum(), rows.square().sum(), (rows.sum(1) * weights).sum() / t.shape[0]]
            ).cpu()
    return "sums " + "/".join(f"{v:.9g}" for v in sums.tolist())
