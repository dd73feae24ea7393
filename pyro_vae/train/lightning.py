"""A model/guide pair as a Lightning module: :class:`PairModule` (``pyro_vae.lightning``).

``PairModule(pair, elbo="meanfield", ...)`` is a :class:`lightning.LightningModule` that trains
any pair :func:`~pyro_vae.train.fit` takes (the package's VAE, a module with ``model`` and
``guide`` methods, or ``PairModule(model, guide)`` for plain functions with ``pyro.param``, a
``PyroModule``, an AutoGuide) with the package's estimators, under Lightning's ``Trainer``:

- ``training_step``: the estimator's loss per datapoint (−bound summed over the batch, divided
  by its size, as ``fit`` steps), logged as ``train_loss`` (the epoch's mean per datapoint),
  with ``beta`` (the KL warm-up's weight at the step, ``warmup`` optimizer steps long);
- ``validation_step``: the evaluator's bounds of each held-out datapoint with
  ``val_particles`` = K draws (:func:`pyro_vae.evaluate.evaluate`), logged as ``val_log_px``
  (log p̂_K(x)) and ``val_elbo`` (the ELBO), means per datapoint, for ``EarlyStopping`` and
  ``ModelCheckpoint`` (``monitor="val_log_px", mode="max"``);
- ``configure_optimizers``: the optimizer by name over the pair's parameters.

Parameters the pair creates on its first run (AutoGuides, ``pyro.param``) are created in
``setup``, before Lightning wraps the module for DDP and builds the optimizer: the pair is run
once on the first training batch (or on ``example``), checked as ``fit`` checks it, and the
entries it reads are adopted as the pair's own (:class:`~pyro_vae.core.pairs.PyroPair`), so they
are module-local, in the optimizer, in checkpoints, and broadcast from rank 0 by DDP. The
``lightning`` package is imported only here, when the class is first used."""

from __future__ import annotations

from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import prune_subsample_sites, site_is_subsample

from pyro_vae.core.pairs import PyroPair, as_pair
from pyro_vae.core.protocol import check_data, check_finite_data, check_model, data_plate_name
from pyro_vae.core.traces import find_data_plate, global_latents
from pyro_vae.data import builtin
from pyro_vae.data.batches import Batch, to_device
from pyro_vae.evaluate import evaluate
from pyro_vae.evaluate.chunks import DEFAULT_PARTICLE_CHUNK
from pyro_vae.infer import LinearWarmup, make_estimator
from pyro_vae.train.fused import FusedLoss, supports
from pyro_vae.train.step import BUILTIN_PLATE_NESTING
from pyro_vae.util.distributed import all_gather_objects, current_context, rank_seed
from pyro_vae.util.errors import ConfigError, TrainingDiverged
from pyro_vae.util.module_state import running_statistics_kept
from pyro_vae.util.optimizers import make_optimizer
from pyro_vae.util.rng import forked_rng

INSTALL = "PairModule needs the lightning package: pip install 'pyro-vae[lightning]'"


def require_lightning() -> Any:
    """The ``lightning`` package, or :class:`~pyro_vae.util.errors.ConfigError` saying in one
    line how to install it."""
    try:
        import lightning
    except ImportError:
        raise ConfigError(INSTALL) from None
    return lightning


class _PairSteps:
    """What :class:`PairModule` adds to :class:`lightning.LightningModule` (the documented
    class is built from the two when first used)."""

    def __init__(
        self,
        pair: Any,
        guide: Any = None,
        *,
        elbo: str = "meanfield",
        particles: int = 1,
        importance_samples: int = 1,
        beta: float = 1.0,
        warmup: int = 0,
        warmup_start: float = 0.01,
        lr: float = 3e-3,
        optimizer: str = "adam",
        optimizer_options: dict | None = None,
        val_particles: int = 100,
        num_data: int | None = None,
        example: Any = None,
        fused: bool = True,
    ) -> None:
        super().__init__()
        self.pair = as_pair(pair, guide)
        if self.pair is None:
            raise ConfigError("PairModule needs a model/guide pair")
        nesting = BUILTIN_PLATE_NESTING if builtin.is_builtin(self.pair) else None
        self.data_plate = data_plate_name(self.pair)
        self.estimator = make_estimator(
            elbo,
            particles,
            importance_samples,
            beta,
            max_plate_nesting=nesting,
            data_plate=self.data_plate,
        )
        self.warmup = LinearWarmup(warmup, warmup_start, beta)
        #: the built-in VAE's loss without traces, where ``fit`` takes it (the same numbers)
        self.fused_loss = (
            FusedLoss(self.pair, self.estimator)
            if fused and supports(self.pair, self.estimator)
            else None
        )
        if val_particles < 1:
            raise ConfigError(f"val_particles must be >= 1, got {val_particles}")
        if num_data is not None and num_data < 1:
            raise ConfigError(f"num_data must be >= 1, got {num_data}")
        self.example, self.num_data, self.prepared = example, num_data, False
        self.num_data_given = num_data is not None
        self.save_hyperparameters(
            dict(
                elbo=elbo,
                particles=particles,
                importance_samples=importance_samples,
                beta=beta,
                warmup=warmup,
                warmup_start=warmup_start,
                lr=lr,
                optimizer=optimizer,
                optimizer_options=dict(optimizer_options or {}),
                val_particles=val_particles,
                num_data=num_data,
                fused=fused,
            )
        )

    # -- before training: the parameters made, the pair and its data plate checked ----------

    def setup(self, stage: str) -> None:
        """Before DDP wraps the module (``stage="fit"``): :meth:`prepare` on the first training
        batch (or ``example``), ``num_data`` taken from the training set's length."""
        if stage != "fit":
            return
        trainer = self.trainer
        trainer.fit_loop.setup_data()  # the training DataLoader, as Lightning will use it
        loader = trainer.train_dataloader
        dataset = getattr(loader, "dataset", None)
        if not self.num_data_given and hasattr(dataset, "__len__"):
            self.num_data = len(dataset)  # this fit's training set, a later fit's its own
        if self.prepared:
            return
        example = self.example
        if example is None:
            if not isinstance(loader, torch.utils.data.DataLoader):
                raise ConfigError(
                    "PairModule runs the pair once on the first training batch before the "
                    "optimizer is built: give it as PairModule(..., example=batch) when the "
                    "training data are not one DataLoader"
                )
            with forked_rng():  # a shuffling loader draws its seed
                example = next(iter(loader))
        self.prepare(example, world_size=trainer.world_size)

    def prepare(self, example: Any, world_size: int = 1) -> None:
        """Run the pair once on the batch ``example`` (as a DataLoader yields it): parameters
        it creates lazily are made and adopted, the pair checked as ``fit`` checks it (its
        data too), and its data plate checked against ``num_data`` and ``world_size``
        processes. ``setup`` calls it; call it yourself before building an optimizer of your
        own."""
        device = next((p.device for p in self.pair.parameters()), torch.device("cpu"))
        call = Batch.of(to_device(example, device, self.data_dtype))
        args, kwargs = call.args, call.kwargs
        if isinstance(self.pair, PyroPair):
            self.pair.discover(*args, **kwargs)
        check_finite_data(*args, **kwargs)
        check_model(self.pair, *args, **kwargs)
        check_data(self.pair, *args, **kwargs)
        self._check_data_plate(args, kwargs, world_size)
        context = current_context()
        if context.enabled:  # DDP needs the same parameters on every rank before it wraps them
            mine = [(name, tuple(p.shape)) for name, p in self.pair.named_parameters()]
            theirs = all_gather_objects(mine, context, "comparing the pair's parameters")
            if any(other != theirs[0] for other in theirs):
                raise ConfigError(
                    "the pair made different parameters on different ranks from their first "
                    "batches: give every rank the same PairModule(..., example=batch)"
                )
        self.prepared = True

    def _check_data_plate(self, args: tuple, kwargs: dict, world_size: int) -> None:
        """Refuse a data plate whose scale would be wrong here: a plate that draws its own
        subsample under several processes, a subsampled plate not sized with the training set,
        global latents without the training set's size."""
        with (
            poutine.block(),
            forked_rng(),
            pyro.validation_enabled(False),
            running_statistics_kept(self.pair),
        ):
            guide = poutine.trace(self.pair.guide).get_trace(*args, **kwargs)
            model = poutine.trace(poutine.replay(self.pair.model, trace=guide)).get_trace(
                *args, **kwargs
            )
        pruned = prune_subsample_sites(model), prune_subsample_sites(guide)
        plate = find_data_plate(*pruned, self.data_plate, required=False)
        if plate is None:
            return
        full, size = next(
            (frame.full_size, frame.size)
            for trace in pruned
            for site in trace.nodes.values()
            if site["type"] == "sample"
            for frame in site["cond_indep_stack"]
            if frame.name == plate
        )
        subsampled = full is not None and full != size
        drawn = subsampled and any(
            site_is_subsample(site) and name == plate
            for trace in (guide, model)
            for name, site in trace.nodes.items()
        )
        if drawn and world_size > 1:
            raise ConfigError(
                f"the data plate {plate!r} draws its own subsample (pyro.plate with "
                f"subsample_size and no subsample): under {world_size} processes each would "
                "draw from its own random stream, not from its share of the DistributedSampler; "
                f"size the plate with the batch, pyro.plate({plate!r}, x.shape[0]), or give it "
                "the batch's indices (subsample=...)"
            )
        if subsampled and self.num_data is not None and full != self.num_data:
            raise ConfigError(
                f"the data plate {plate!r} is subsampled from {full} datapoints but the "
                f"training set has {self.num_data}: its scale (size / batch) would be wrong; "
                f"size it with the whole training set, pyro.plate({plate!r}, {self.num_data}, "
                "subsample=...) (under DDP: not a rank's share)"
            )
        if global_latents(pruned[0], plate) and self.num_data is None:
            raise ConfigError(
                f"the pair has global latents {global_latents(pruned[0], plate)}, whose term "
                "each step weights by batch / training set size: give PairModule(..., "
                "num_data=N), the training set's size"
            )

    def on_fit_start(self) -> None:
        """Under several processes, rank r > 0 draws its own noise: torch's generator (Pyro's
        draws) reseeded with ``rank_seed(seed, r)`` of the seed it was given (the same on every
        rank after ``lightning.seed_everything``), as ``fit`` does; rank 0 keeps its stream."""
        if self.trainer.world_size > 1 and self.global_rank > 0:
            torch.manual_seed(rank_seed(torch.initial_seed(), self.global_rank))

    @property
    def data_dtype(self) -> torch.dtype:
        """The pair's floating-point dtype: every floating-point batch is cast to it."""
        return next(
            (p.dtype for p in self.pair.parameters() if p.is_floating_point()),
            torch.get_default_dtype(),
        )

    def transfer_batch_to_device(self, batch: Any, device: torch.device, index: int) -> Any:
        return to_device(batch, device, self.data_dtype)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """The pair's own ``load_state_dict`` on the ``pair.`` entries (a
        :class:`~pyro_vae.core.pairs.PyroPair` keeps the entries it has not read yet)."""
        prefix = "pair."
        other = [key for key in state_dict if not key.startswith(prefix)]
        if other and strict:
            raise ConfigError(f"the state holds entries {other[:3]} outside the pair")
        own = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        return self.pair.load_state_dict(own, strict=strict, assign=assign)

    # -- the steps --------------------------------------------------------------------------

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        call = Batch.of(batch)
        size, estimator = call.size, self.estimator
        estimator.beta = self.warmup(self.global_step)
        estimator.global_weight = size / self.num_data if self.num_data else 1.0
        fused, pair = self.fused_loss, self.pair
        with pyro.validation_enabled(False):
            args = call.args if fused is not None else (pair.model, pair.guide, *call.args)
            loss = (fused or estimator.differentiable_loss)(*args, **call.kwargs) / size
        if not torch.isfinite(loss):
            raise TrainingDiverged(
                f"the training loss became {loss.item()} at step {self.global_step}. Try a "
                f"smaller learning rate than lr={self.hparams.lr:g}"
            )
        log = dict(on_step=False, on_epoch=True, batch_size=size, sync_dist=True)
        self.log("train_loss", loss.detach(), prog_bar=True, **log)
        self.log("beta", estimator.beta, **log)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.global_step > 1:  # a parameter made after the optimizer: refused, not ignored
            return
        held = {id(p) for group in self.optimizers().param_groups for p in group["params"]}
        missing = [n for n, p in self.pair.named_parameters() if id(p) not in held]
        if missing:
            raise ConfigError(
                f"the pair made parameters {missing[:3]} during training, which the optimizer "
                "does not hold: call module.prepare(first_batch) before trainer.fit"
            )

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        call = Batch.of(batch)
        result = evaluate(
            self.pair.model,
            self.pair.guide,
            *call.args,
            num_particles=self.hparams.val_particles,
            particle_chunk=DEFAULT_PARTICLE_CHUNK,
            khat=False,
            keep_log_weights=False,
            max_plate_nesting=self.estimator.max_plate_nesting,
            data_plate=self.data_plate,
            **call.kwargs,
        )
        log = dict(on_epoch=True, batch_size=result.num_datapoints, sync_dist=True)
        self.log("val_log_px", result.log_px.mean().item(), prog_bar=True, **log)
        self.log("val_elbo", result.elbo.mean().item(), **log)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hparams = self.hparams
        return make_optimizer(
            self.pair.parameters(), hparams.lr, hparams.optimizer, hparams.optimizer_options
        )


def __getattr__(name: str) -> Any:
    """``PairModule``, built on first use from :class:`lightning.LightningModule` (so that
    importing this module needs no ``lightning``)."""
    if name != "PairModule":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    lightning = require_lightning()
    cls = type(
        "PairModule",
        (_PairSteps, lightning.LightningModule),
        {"__module__": __name__, "__doc__": PAIR_MODULE_DOC},
    )
    globals()["PairModule"] = cls
    return cls


PAIR_MODULE_DOC = """A model/guide pair trained by Lightning with the package's estimators (see
:mod:`pyro_vae.train.lightning`).

``pair`` (and ``guide``) take what :func:`~pyro_vae.train.fit` takes; ``elbo``,
``particles``, ``importance_samples``, ``beta``, ``warmup``, ``warmup_start``, ``lr``,
``optimizer`` and ``optimizer_options`` mean what they mean for ``fit`` (the same defaults);
``val_particles`` is K of the held-out log p̂_K(x); ``num_data`` the training set's size
(default: the length of the training DataLoader's dataset), which weights global latents and
must be the size of a subsampled data plate; ``example`` a first training batch for
:meth:`prepare` (default: the training DataLoader's first); ``fused=False`` takes the built-in
VAE's steps through Pyro's traces. Every floating-point batch is cast to the pair's dtype.

``module.prepare(batch)`` runs the pair once on a batch: its lazily created parameters made,
the pair checked as ``fit`` checks it and its data plate as the module docstring says;
``setup`` calls it on the first training batch, before the optimizer is built.

:raises ConfigError: in one line, for what ``fit`` refuses, a data plate whose scale would be
    wrong, or (on first use) a missing ``lightning`` package.
"""
