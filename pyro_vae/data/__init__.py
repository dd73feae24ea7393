"""Data: the bundled digits and MNIST (:mod:`~pyro_vae.data.images`), a user's data as a source
of batches (:mod:`~pyro_vae.data.batches`), data and factories named on the command line
(:mod:`~pyro_vae.data.specs`), and the built-in families on their images
(:mod:`~pyro_vae.data.builtin`).
"""

from pyro_vae.data.batches import as_source
from pyro_vae.data.images import (
    Dataset,
    Split,
    load_binarized_mnist,
    load_dataset,
    load_digits,
    load_mnist,
)

__all__ = [
    "Dataset",
    "Split",
    "as_source",
    "load_binarized_mnist",
    "load_dataset",
    "load_digits",
    "load_mnist",
]
