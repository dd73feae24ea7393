"""What :func:`~pyro_vae.train.fit` trains on: the built-in images or the user's data, each
with its default model (the config's family, or none) and its checks of the pair.

Both offer the same three things to the engine: ``dataset`` (the built-in images for the run
folder's plots, or ``None``), ``default_model()`` (the model trained when none is given) and
``sources(model, given)`` (the training and held-out sources, the pair checked on them, and
whether its networks take a particle dimension)."""

from __future__ import annotations

from typing import Any

import pyro
import torch

from pyro_vae.core.pairs import PyroPair
from pyro_vae.core.protocol import (
    check_batches,
    check_data,
    check_finite_data,
    check_model,
    data_plate_name,
    pair_activation_bytes,
)
from pyro_vae.core.traces import guess_max_plate_nesting
from pyro_vae.core.vectorization import particle_mismatch
from pyro_vae.data import builtin
from pyro_vae.data.batches import Source, as_source
from pyro_vae.data.specs import load_data
from pyro_vae.evaluate.weights import eval_mode
from pyro_vae.runs.config import TrainConfig
from pyro_vae.util import memory
from pyro_vae.util.distributed import DistributedContext, main_first
from pyro_vae.util.errors import ConfigError, PyroVAEError
from pyro_vae.util.rng import forked_rng

Sources = tuple[Source, Source | None, bool]


class BuiltinData:
    """The config's built-in dataset (digits or MNIST, downloaded first by rank 0 with
    ``download``), binarized as ``config.binarize`` says; its default model is the config's
    family, sized for the dataset and initialized from its images."""

    def __init__(
        self,
        config: TrainConfig,
        device: torch.device,
        dist: DistributedContext,
        download: bool = False,
    ) -> None:
        self.config, self.device = config, device
        with main_first(dist, "waiting for rank 0 to download the data", enabled=download):
            self.dataset = builtin.prepare_data(config, device, download=download)

    def default_model(self) -> torch.nn.Module:
        config = self.config
        rows = config.batch_size * config.particles * config.importance_samples
        model = builtin.build_model(
            self.dataset, config, rows=rows, training=True, device=self.device
        )
        model.initialize_from_data(self.dataset.train.images)
        return model

    def sources(self, model: torch.nn.Module, given: bool) -> Sources:
        """The training images, the test images scored after each epoch; a ``given`` pair
        (not built here) is checked on two training images first."""
        dataset, config = self.dataset, self.config
        source = builtin.train_source(dataset, config, model)
        held_out = builtin.eval_source(dataset, "test", config, model)
        if given:
            example = builtin.model_args(
                model,
                builtin.evaluation_images(dataset, "train", config)[:2],
                dataset.train.labels[:2],
            )
            if isinstance(model, PyroPair):
                model.discover(*example)
            check_model(model, *example)
        return source, held_out, True


class UserData:
    """The user's data in any form :func:`~pyro_vae.data.batches.as_source` takes (or the config's
    ``data`` and ``test_data`` specs), cast to the parameters' dtype and moved to the device;
    there is no default model."""

    dataset = None

    def __init__(
        self,
        config: TrainConfig,
        device: torch.device,
        data: Any,
        test_data: Any,
        collate_fn: Any = None,
    ) -> None:
        self.config, self.device = config, device
        self.data, self.test_data, self.collate_fn = data, test_data, collate_fn

    def default_model(self) -> torch.nn.Module:
        raise ConfigError("no model to train: give a model/guide pair")

    def sources(self, model: torch.nn.Module, given: bool) -> Sources:
        """The sources, the pair checked on the first batch of each (``given`` is always true:
        the user's data have no model of their own)."""
        data, test_data, config = self.data, self.test_data, self.config
        if data is None:
            if config.data is None:
                raise ConfigError("no data to train on: give data (or a config with a dataset)")
            data, paired = load_data(config.data)
            test_data = load_data(config.test_data)[0] if config.test_data else paired
        dtype = _param_dtype(model)
        source = as_source(data, self.collate_fn).to(self.device, dtype)
        held_out = (
            None
            if test_data is None
            else as_source(test_data, self.collate_fn).to(self.device, dtype)
        )
        vectorizable = _check_pair(model, source, config, self.device)
        if held_out is not None:  # scored after every epoch: checked before the first
            with forked_rng():  # a loader draws its seed
                first = next(iter(held_out.ordered(config.batch_size)))
            try:
                check_finite_data(*first.args, **first.kwargs)
                check_model(model, *first.args, **first.kwargs)
                checks = check_data(model, *first.args, **first.kwargs)
                check_batches(checks, held_out.ordered(config.batch_size))
            except PyroVAEError as exc:
                raise type(exc)(f"the test data: {exc}") from None
        return source, held_out, vectorizable


def _param_dtype(model: torch.nn.Module) -> torch.dtype:
    return next(
        (p.dtype for p in model.parameters() if p.is_floating_point()), torch.get_default_dtype()
    )


def _check_pair(
    model: torch.nn.Module, source: Source, config: TrainConfig, device: torch.device
) -> bool:
    """Run the pair once on the first batch as training will see it (a guide may have one
    parameter per datapoint of a batch), in a forked state: its data (unless the source
    transforms each epoch's batches) against its likelihood,
    its memory per particle measured and extrapolated to the particles of a step; return
    whether its networks take a particle dimension (:mod:`pyro_vae.core.vectorization`)."""
    first = next(iter(source.ordered(config.batch_size)))
    check_finite_data(*first.args, **first.kwargs)
    if isinstance(model, PyroPair):
        model.discover(*first.args, **first.kwargs)
    check_model(model, *first.args, **first.kwargs)
    if getattr(source, "transform", None) is None:  # a transform (binarization) acts per epoch
        checks = check_data(model, *first.args, **first.kwargs)
        check_batches(checks, source.ordered(config.batch_size))
    per_particle = pair_activation_bytes(model, *first.args, **first.kwargs)
    draws = config.particles * config.importance_samples
    params = sum(p.numel() for p in model.parameters())
    memory.require(
        params * memory.TRAIN_BYTES_PER_PARAM
        + per_particle * draws * memory.TRAIN_ACTIVATION_COPIES // 2,
        f"training {draws:,} particle(s) per step on batches of {first.size:,} "
        f"({memory.format_bytes(per_particle)} per particle, measured on the first "
        "batch)",
        device,
    )
    nesting = guess_max_plate_nesting(model.model, model.guide, first.args, first.kwargs)
    with eval_mode(model.model), forked_rng(), pyro.validation_enabled(False):
        return (
            particle_mismatch(
                model.model,
                model.guide,
                first.args,
                first.kwargs,
                max_plate_nesting=nesting,
                data_plate=data_plate_name(model),
            )
            is None
        )
