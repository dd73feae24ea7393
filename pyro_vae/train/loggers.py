"""Training curves for a dashboard: a :class:`~pyro_vae.train.Callback` that writes what the
history records to TensorBoard's event files (``torch.utils.tensorboard``; the ``tensorboard``
package is an optional extra, imported only when a logger is made).

Per epoch (the epoch as the step): ``train/loss`` (−ELBO per datapoint, the estimator's),
``test/elbo`` (the held-out ELBO, with held-out data), ``train/seconds``, ``train/beta`` (the
KL weight at the epoch's last step) and ``train/lr``; with early stopping ``test/best_elbo``. At
the end, the final estimate's numbers (``final/test_log_px``, ``final/test_log_px_stderr``,
``final/test_elbo``, ``final/test_gap``) at the last epoch, and the run's config as text. A
resumed run appends to the same folder and drops what an interrupted run had logged after its
last checkpoint (``purge_step``), so the curves are those of the history.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pyro_vae.train.loop import Callback, Loop
from pyro_vae.util.errors import ConfigError

#: the loggers by the name ``RunOptions.log`` (``--log``) gives them
LOGGERS = ("tensorboard",)
#: the run folder's subfolder of the event files
LOG_DIR = "tensorboard"


def require_logger(name: str) -> type:
    """The writer class of the logger ``name`` (one of :data:`LOGGERS`), or one line saying
    what to install: checked before a run starts."""
    if name not in LOGGERS:
        raise ConfigError(f"log must be one of {LOGGERS}, got {name!r}")
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(
            "log='tensorboard' needs the tensorboard package: pip install 'pyro-vae[tensorboard]'"
        ) from None
    return SummaryWriter


class TensorBoardLogger(Callback):
    """Writes the run's curves to TensorBoard event files in ``log_dir`` (rank 0 only, as
    ``is_main`` says); ``config`` (a mapping) is logged once as text."""

    def __init__(
        self, log_dir: str | Path, config: dict[str, Any] | None = None, is_main: bool = True
    ) -> None:
        self.log_dir, self.config, self.is_main = Path(log_dir), config, is_main
        self.writer_class = require_logger("tensorboard")
        self.writer: Any = (
            None  # made after the first epoch: a run that trains nothing logs nothing
        )

    def _writer(self, loop: Loop, first_new: int) -> Any:
        """The writer, made on first use: the steps from ``first_new`` on are this process's,
        so those an interrupted run logged there are dropped."""
        if self.writer is None:
            self.writer = self.writer_class(log_dir=str(self.log_dir), purge_step=first_new)
            if self.config is not None:
                text = json.dumps(self.config, indent=2, sort_keys=True)
                self.writer.add_text("config", f"```\n{text}\n```", first_new)
        return self.writer

    def on_epoch_end(self, loop: Loop) -> None:
        if not self.is_main:
            return
        writer, history, epoch = self._writer(loop, loop.epoch), loop.history, loop.epoch
        writer.add_scalar("train/loss", history.train_loss[-1], epoch)
        writer.add_scalar("train/seconds", history.seconds[-1], epoch)
        writer.add_scalar("train/beta", loop.step.estimator.beta, epoch)
        rates = history.extra.get("lr")  # the epoch's own, before a scheduler's step
        rate = rates[-1] if rates else loop.optimizer.param_groups[0]["lr"]
        writer.add_scalar("train/lr", rate, epoch)
        if len(history.test_elbo) == len(history.epoch):
            writer.add_scalar("test/elbo", history.test_elbo[-1], epoch)
        stopping = history.extra.get("early_stopping")
        if stopping:
            writer.add_scalar("test/best_elbo", stopping["best_test_elbo"], epoch)
        writer.flush()

    def on_fit_end(self, loop: Loop) -> None:
        final = loop.history.extra.get("final")
        if not self.is_main or not final or not loop.history.epoch:
            return
        writer = self._writer(loop, loop.epoch + 1)  # no epoch trained here: keep them all
        for name in ("test_log_px", "test_log_px_stderr", "test_elbo", "test_gap"):
            if final.get(name) is not None:
                writer.add_scalar(f"final/{name}", final[name], loop.history.epoch[-1])
        writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
