"""Training curves for a dashboard: a :class:`~pyro_vae.train.Callback` that writes what the
history records to TensorBoard's event files (``torch.utils.tensorboard``; the ``tensorboard``
package is an optional extra, imported only when a logger is made); the names and values
shared with :mod:`pyro_vae.train.mlflow_logger` and :mod:`pyro_vae.train.wandb_logger`.

Per epoch (the epoch as the step): ``train/loss`` (−ELBO per datapoint, the estimator's),
``test/elbo`` (the held-out ELBO, with held-out data), ``train/seconds``, ``train/beta`` (the
KL weight at the epoch's last step) and ``train/lr``; with early stopping ``test/best_elbo``;
in an epoch with a held-out estimate (:mod:`pyro_vae.train.estimates`) ``test/log_px``,
``test/gap``, ``test/ess``, ``test/khat_max``, ``test/khat_bad``, ``test/rate``,
``test/distortion``, and ``test/log_px_stderr``, ``test/rate_stderr``,
``test/distortion_stderr`` (``test/trace_enum_elbo`` too, with guide sites summed out; the
estimate before training is in the history alone). At the
end, the final estimate's numbers (``final/test_log_px``, ``final/test_log_px_stderr``,
``final/test_elbo``, ``final/test_gap``) at the last epoch, the run folder's plots as images
(``plots/NAME``), and the run's config as text and as the final numbers' hyperparameters
(the HParams dashboard's run ``hparams``). A resumed run appends to the same folder and
drops what an interrupted run had logged after its last checkpoint (``purge_step``), so the
curves are those of the history.

Per step (the run's step count from 1 as the step): ``train/step_loss``, each step's mean loss
per datapoint of its batch, written with the epoch's scalars (after its checkpoint) into the
subfolder ``steps`` (its own steps, its own purge).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from pyro_vae.train.estimates import NAMES, estimate_at
from pyro_vae.train.loop import Callback, Loop
from pyro_vae.util.errors import ConfigError

#: the loggers by the name ``RunOptions.log`` (``--log``) gives them
LOGGERS = ("tensorboard", "mlflow", "wandb")
#: the run folder's subfolder of the event files
LOG_DIR = "tensorboard"
#: the subfolder of the hyperparameters (TensorBoard's HParams dashboard)
HPARAMS_RUN = "hparams"
#: the per-step scalar's name
STEP_LOSS = "train/step_loss"
#: the final estimate's numbers logged as ``final/NAME`` at the last epoch
FINAL_NAMES = ("test_log_px", "test_log_px_stderr", "test_elbo", "test_gap")


def hparam_values(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The config's entries as flat hyperparameters: nested mappings as ``outer.inner`` keys,
    numbers, booleans and strings as they are, anything else (``None``, lists) as its JSON."""
    values: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            values.update(hparam_values(value, f"{prefix}{key}."))
        elif isinstance(value, (bool, int, float, str)):
            values[f"{prefix}{key}"] = value
        else:
            values[f"{prefix}{key}"] = json.dumps(value)
    return values


def require_logger(name: str) -> Any:
    """The writer of the logger ``name`` (one of :data:`LOGGERS`: TensorBoard's
    ``SummaryWriter``, MLflow's ``MlflowClient``, the ``wandb`` module), or one line saying what
    to install: checked before a run starts."""
    if name not in LOGGERS:
        raise ConfigError(f"log must be one of {LOGGERS}, got {name!r}")
    try:
        if name == "mlflow":
            from mlflow.tracking import MlflowClient

            return MlflowClient
        if name == "wandb":
            import wandb

            return wandb
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(
            f"log={name!r} needs the {name} package: pip install 'pyro-vae[{name}]'"
        ) from None
    return SummaryWriter


def check_log_options(log: str | None, log_uri: str | None, run_dir: Any) -> None:
    """``fit``'s logging options checked before the run folder is touched."""
    if log_uri is not None and log != "mlflow":
        raise ConfigError(f"log_uri={log_uri!r} is an MLflow tracking store: it needs log='mlflow'")
    if log is not None:
        require_logger(log)
        if run_dir is None:
            raise ConfigError(f"log={log!r} writes into the run folder: give run_dir")


def epoch_scalars(loop: Loop, index: int) -> dict[str, float]:
    """The scalars of the history's epoch at ``index``, by name (``test/best_elbo`` for the
    last epoch only: the history keeps the current best alone)."""
    history = loop.history
    epoch = history.epoch[index]
    steps = loop.replicas.steps_per_epoch(loop.data.source, loop.data.batch_size)
    rates = history.extra.get("lr")  # each epoch's own, before a scheduler's step
    scalars = {
        "train/loss": history.train_loss[index],
        "train/seconds": history.seconds[index],
        "train/beta": float(loop.step.warmup(epoch * steps - 1)),  # at the epoch's last step
        "train/lr": rates[index] if rates else loop.optimizer.param_groups[0]["lr"],
    }
    if len(history.test_elbo) == len(history.epoch):
        scalars["test/elbo"] = history.test_elbo[index]
    estimate = estimate_at(history, epoch)
    for name in NAMES if estimate is not None else ():
        if estimate.get(name) is not None:
            scalars[f"test/{name}"] = estimate[name]
    stopping = history.extra.get("early_stopping")
    if stopping and epoch == history.epoch[-1]:
        scalars["test/best_elbo"] = stopping["best_test_elbo"]
    return scalars


class StepLosses:
    """The steps' losses gathered as tensors, read in one synchronisation per epoch."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.losses: list[torch.Tensor] = []
        self.times: list[float] = []

    def add(self, step: int, loss: torch.Tensor) -> None:
        self.steps.append(step)
        self.losses.append(loss)
        self.times.append(time.time())

    def drain(self) -> list[tuple[int, float, float]]:
        """(step, loss, wall-clock time) of each step gathered since the last call."""
        values = torch.stack(self.losses).tolist() if self.losses else []
        drained = list(zip(self.steps, values, self.times))
        self.steps, self.losses, self.times = [], [], []
        return drained


def after_existing_event_files(log_dir: Path) -> None:
    """Wait, if need be, until a new event file in ``log_dir`` sorts after those there.

    TensorBoard reads a folder's event files in the order of their names,
    ``events.out.tfevents.SECONDS.HOST.PID.N``, and takes a step that goes back as a restart
    (it drops the later steps it read). A file opened in the same second as the newest one can
    sort before it (``...PID.10`` < ``...PID.9``), which would drop a resumed run's curves;
    waiting for the next second (at most one) orders them as they were written."""
    stamps = [
        int(parts[3])
        for path in log_dir.glob("events.out.tfevents.*")
        if len(parts := path.name.split(".")) > 3 and parts[3].isdigit()
    ]
    while stamps and int(time.time()) <= max(stamps):
        time.sleep(0.05)


class DashboardLogger(Callback):
    """The part every logger shares: rank 0 alone logs (``is_main``), and each step's loss is
    gathered (:class:`StepLosses`) to be read once at the epoch's end. A subclass sets
    ``is_main`` and ``step_losses`` in its constructor."""

    is_main: bool
    step_losses: StepLosses

    def on_step_end(self, loop: Loop, step: int, loss: torch.Tensor) -> None:
        if self.is_main:
            self.step_losses.add(step, loss)


class TensorBoardLogger(DashboardLogger):
    """Writes the run's curves to TensorBoard event files in ``log_dir`` (rank 0 only, as
    ``is_main`` says); ``config`` (a mapping) is logged once as text and, at the end, as the
    hyperparameters of the final numbers (the HParams dashboard, in ``log_dir/hparams``),
    with the PNG plots of ``plots_dir`` as images (``plots/NAME``)."""

    def __init__(
        self,
        log_dir: str | Path,
        config: dict[str, Any] | None = None,
        is_main: bool = True,
        plots_dir: str | Path | None = None,
    ) -> None:
        self.log_dir, self.config, self.is_main = Path(log_dir), config, is_main
        self.plots_dir = None if plots_dir is None else Path(plots_dir)
        self.writer_class = require_logger("tensorboard")
        self.writer: Any = (
            None  # made after the first epoch: a run that trains nothing logs nothing
        )
        self.step_writer: Any = None
        self.step_losses = StepLosses()

    def _writer(self, loop: Loop, first_new: int) -> Any:
        """The writer, made on first use: the steps from ``first_new`` on are this process's,
        so those an interrupted run logged there are dropped."""
        if self.writer is None:
            after_existing_event_files(self.log_dir)
            self.writer = self.writer_class(log_dir=str(self.log_dir), purge_step=first_new)
            if self.config is not None:
                text = json.dumps(self.config, indent=2, sort_keys=True)
                self.writer.add_text("config", f"```\n{text}\n```", first_new)
        return self.writer

    def on_epoch_end(self, loop: Loop) -> None:
        if not self.is_main:
            return
        writer = self._writer(loop, loop.epoch)
        for name, value in epoch_scalars(loop, -1).items():
            writer.add_scalar(name, value, loop.epoch)
        writer.flush()
        steps = self.step_losses.drain()
        if steps:
            if self.step_writer is None:  # purges what an interrupted run logged from here
                after_existing_event_files(self.log_dir / "steps")
                self.step_writer = self.writer_class(
                    log_dir=str(self.log_dir / "steps"), purge_step=steps[0][0]
                )
            for step, value, wall_time in steps:
                self.step_writer.add_scalar(STEP_LOSS, value, step, walltime=wall_time)
            self.step_writer.flush()

    def on_fit_end(self, loop: Loop) -> None:
        if not self.is_main or not loop.history.epoch:
            return
        writer = self._writer(loop, loop.epoch + 1)  # no epoch trained here: keep them all
        last = loop.history.epoch[-1]
        final = loop.history.extra.get("final") or {}
        metrics = {f"final/{n}": final[n] for n in FINAL_NAMES if final.get(n) is not None}
        for name, value in metrics.items():
            writer.add_scalar(name, value, last)
        if self.plots_dir is not None:
            from matplotlib.image import imread

            for plot in sorted(self.plots_dir.glob("*.png")):
                writer.add_image(f"plots/{plot.stem}", imread(plot), last, dataformats="HWC")
        if self.config is not None:  # the HParams dashboard: the config beside the final numbers
            writer.add_hparams(hparam_values(self.config), metrics, run_name=HPARAMS_RUN)
        writer.flush()

    def close(self) -> None:
        for writer in (self.writer, self.step_writer):
            if writer is not None:
                writer.close()
        self.writer = self.step_writer = None
