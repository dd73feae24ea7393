"""The training engine: :func:`fit` trains any model/guide pair on any data.

- :mod:`~pyro_vae.train.step`: the estimator, the optimizer and one SVI step;
- :mod:`~pyro_vae.train.loop`: the epochs, knowing nothing of files or ranks, and the
  :class:`Callback` interface;
- :mod:`~pyro_vae.train.callbacks`: progress bar, run-folder checkpoint, final estimate, plots;
- :mod:`~pyro_vae.train.parallel`: data parallelism around the step and the data;
- :mod:`~pyro_vae.train.fit`: :func:`fit`, which puts them together.

The run folder's files are :mod:`pyro_vae.runs`'s.
"""

from pyro_vae.train.fit import TrainResult, fit
from pyro_vae.train.loop import Callback, Loop, run_epochs
from pyro_vae.train.step import make_elbo, make_optimizer, svi_step

__all__ = ["Callback", "Loop", "TrainResult", "fit", "make_elbo", "make_optimizer",
           "run_epochs", "svi_step"]
