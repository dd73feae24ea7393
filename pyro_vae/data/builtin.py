"""The package's own families on its own datasets, as one more model and data source.

:func:`build_model` makes the family a :class:`~pyro_vae.models.config.ModelConfig` names, sized for
the dataset; :func:`train_source` and :func:`eval_source` turn the digits or MNIST images (and
their labels, for a conditional model) into sources of batches for the training engine and
the evaluator: the training images freshly binarized every epoch (``binarize="dynamic"``), once
with a seed (``"fixed"``) or left as intensities (``"none"``); evaluation images binarized
once with a seed of their own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from pyro_vae.data import images as data_lib
from pyro_vae.data.batches import TensorSource
from pyro_vae.models.cvae import CVAE
from pyro_vae.models.vae import VAE
from pyro_vae.models.vae2 import VAE2
from pyro_vae.models.vampprior import VampPriorVAE
from pyro_vae.util import memory

if TYPE_CHECKING:
    from pyro_vae.runs.config import TrainConfig

TEST_BINARIZATION_OFFSET = 1


def build_model(
    dataset: data_lib.Dataset,
    config: TrainConfig,
    *,
    rows: int = 0,
    training: bool = False,
    device: torch.device | str = "cpu",
) -> VAE:
    """The model family named by ``config.model.family``, sized for ``dataset``.

    Its memory is estimated first on the meta device (:mod:`pyro_vae.util.memory`): the parameters,
    plus the activations of ``rows`` datapoint-particles per step (with gradients and Adam's
    state when ``training``); a network that cannot fit on ``device`` is refused with one line
    before anything is allocated."""
    footprint = memory.network_footprint(lambda: _build(dataset, config))
    if footprint is not None:
        params, width = footprint
        nbytes = (memory.training_bytes if training else memory.inference_bytes)(
            params, width, rows
        )
        what = f"the {config.model.family} network ({params:,} parameters" + (
            f", {rows:,} datapoint-particles per step)" if rows else ")"
        )
        memory.require(nbytes, what, device)
    return _build(dataset, config)


def network_width(dataset: data_lib.Dataset, config: TrainConfig) -> int:
    """Activations per datapoint-particle of the config's network (for memory estimates)."""
    footprint = memory.network_footprint(lambda: _build(dataset, config))
    return 1 if footprint is None else footprint[1]


def _build(dataset: data_lib.Dataset, config: TrainConfig) -> VAE:
    spec = config.model
    common = dict(
        latent_dim=spec.latent_dim,
        hidden=spec.hidden,
        scale_fn=spec.scale_fn,
        likelihood=spec.likelihood,
        obs_scale=spec.obs_scale,
        activation=spec.activation,
    )
    if spec.family == "cvae":
        model = CVAE(dataset.input_dim, dataset.num_classes, guide=spec.guide, **common)
        model.set_class_probs(dataset.train.labels)
    elif spec.family == "vae2":
        model = VAE2(
            dataset.input_dim, latent2_dim=spec.latent2_dim, hidden2=spec.hidden2, **common
        )
    elif spec.family == "vampprior":
        model = VampPriorVAE(dataset.input_dim, pseudo_inputs=spec.pseudo_inputs, **common)
    else:
        model = VAE(dataset.input_dim, guide=spec.guide, **common)
    return model


def is_builtin(model: torch.nn.Module) -> bool:
    """Whether ``model`` is one of the package's families (which a config describes)."""
    return type(model) in (VAE, CVAE, VAE2, VampPriorVAE)


def model_args(
    model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """The positional arguments of ``model.model`` / ``model.guide`` for a batch."""
    return (images, labels) if getattr(model, "conditional", False) else (images,)


def prepare_data(
    config: TrainConfig, device: torch.device, download: bool = False
) -> data_lib.Dataset:
    """The config's dataset, checked and moved to ``device``."""
    dataset = data_lib.load_dataset(config.dataset, config.data_dir, download=download)
    for split in ("train", "test"):
        part = getattr(dataset, split)
        data_lib.validate_images(
            part.images,
            labels=part.labels,
            num_classes=dataset.num_classes,
            what=f"{dataset.name} {split}",
        )
    return dataset.to(device)


def evaluation_images(dataset: data_lib.Dataset, split: str, config: TrainConfig) -> torch.Tensor:
    """The images a run is evaluated on: a fixed seeded binarization (or the raw intensities)."""
    images = getattr(dataset, split).images
    if config.binarize == "none":
        return images
    offset = 0 if split == "train" else TEST_BINARIZATION_OFFSET
    return data_lib.fixed_binarization(images, config.seed + offset)


def _binarize_first(tensors: tuple, generator: torch.Generator) -> tuple:
    return (data_lib.binarize(tensors[0], generator), *tensors[1:])


def train_source(
    dataset: data_lib.Dataset, config: TrainConfig, model: torch.nn.Module
) -> TensorSource:
    """The training images (with labels for a conditional model) as the engine's source."""
    images, labels = dataset.train.images, dataset.train.labels
    if config.binarize == "fixed":
        images = data_lib.fixed_binarization(images, config.seed)
    transform = _binarize_first if config.binarize == "dynamic" else None
    return TensorSource(model_args(model, images, labels), transform)


def eval_source(
    dataset: data_lib.Dataset,
    split: str,
    config: TrainConfig,
    model: torch.nn.Module,
    limit: int | None = None,
) -> TensorSource:
    """A split's evaluation images (the first ``limit``) as a source of batches."""
    images, labels = evaluation_images(dataset, split, config), getattr(dataset, split).labels
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return TensorSource(model_args(model, images, labels))
