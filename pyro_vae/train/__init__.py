"""The training engine: :func:`fit` trains any model/guide pair on any data.

- :mod:`~pyro_vae.train.config`: :class:`RunOptions`, how a run is run (its
  :class:`~pyro_vae.runs.config.TrainConfig`, what it computes, is the run folder's);
- :mod:`~pyro_vae.train.step`: the optimizer and one SVI step (the estimators are
  :func:`pyro_vae.infer.make_estimator`'s);
- :mod:`~pyro_vae.train.loop`: the epochs, knowing nothing of files or ranks, and the
  :class:`Callback` interface;
- :mod:`~pyro_vae.train.callbacks`: progress bar, run-folder checkpoint, final estimate, plots;
- :mod:`~pyro_vae.train.parallel`: data parallelism around the step and the data;
- :mod:`~pyro_vae.train.sources`: the built-in images or the user's data, each with its
  default model;
- :mod:`~pyro_vae.train.engine`: :func:`fit`, which puts them together.

The run folder's files are :mod:`pyro_vae.runs`'s.
"""

from pyro_vae.runs.config import TrainConfig
from pyro_vae.train.config import RunOptions
from pyro_vae.train.engine import TrainResult, fit
from pyro_vae.train.loop import Batches, Callback, HeldOut, Loop, Step, run_epochs
from pyro_vae.train.step import svi_step
from pyro_vae.util.optimizers import make_optimizer

__all__ = [
    "Batches",
    "Callback",
    "HeldOut",
    "Loop",
    "RunOptions",
    "Step",
    "TrainConfig",
    "TrainResult",
    "fit",
    "make_optimizer",
    "run_epochs",
    "svi_step",
]
