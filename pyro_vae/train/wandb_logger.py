"""Training curves in a Weights & Biases run: a :class:`~pyro_vae.train.Callback` logging the
scalars of :mod:`pyro_vae.train.loggers` (the same names), the run's config as the W&B config,
the final estimate as ``final/NAME`` metrics and summary values, and the run folder's plots as
images, through the optional ``wandb`` package (imported only when a logger is made).

Offline by default: the W&B run is written to ``RUN_DIR/wandb/offline-run-*`` and nothing is
sent (``wandb sync`` uploads it later); W&B's own variables say otherwise: ``WANDB_MODE``
(``online`` to log to the server as the run goes), ``WANDB_PROJECT`` (else ``pyro-vae``) and
``WANDB_DIR`` (the folder that receives ``wandb/``, else the run folder). The W&B run is named
after the run folder; W&B prints nothing to the terminal and captures none of its output.

Two x axes (W&B's ``define_metric``): the per-epoch scalars and ``final/NAME`` are plotted
against ``epoch``, ``train/step_loss`` against ``train/step`` (the run's step count from 1),
each row carrying its own axis value. W&B's own step (``_step``) is the run's step count at the
row's last step (an epoch's row shares its last step's), so it only grows, also across the
offline segments a resumed run writes (W&B offline starts each at 0; ``wandb sync`` uploads a
run's segments in order); a row that W&B's step is already past (a resumed online run's final
estimate) takes W&B's next step.

Resume: the W&B run's id, project and folder are kept in the history (``extra["wandb"]``,
saved with every checkpoint), so a resumed run continues the same W&B run (``resume="allow"``,
a new offline segment in the same folder). The epochs it holds are recorded beside its
segments, in ``wandb/pyro-vae-ID.json``, after each epoch is logged (the checkpoint, written
before, cannot say so); a resumed run logs the epochs it lacks and never one twice.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any

from pyro_vae.runs import History
from pyro_vae.train.loggers import (
    FINAL_NAMES,
    STEP_LOSS,
    DashboardLogger,
    StepLosses,
    epoch_scalars,
    require_logger,
)
from pyro_vae.train.loop import Loop
from pyro_vae.util.errors import ConfigError
from pyro_vae.util.files import read_json
from pyro_vae.util.io import write_json

#: the project of runs logged without ``WANDB_PROJECT``
PROJECT = "pyro-vae"
#: the x axes: of the per-epoch scalars, and of the per-step loss
EPOCH_AXIS, STEP_AXIS = "epoch", "train/step"
#: the mode of a run logged without ``WANDB_MODE``
DEFAULT_MODE = "offline"
#: W&B's names of the modes that send nothing
OFFLINE_MODES = ("offline", "dryrun")


def _one_line(exc: Exception) -> str:
    """W&B's refusal on one line; a setting that W&B's settings model refuses, by its name."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        with contextlib.suppress(Exception):
            first = errors()[0]
            name = ".".join(str(part) for part in first["loc"])
            return f"{name}={first['input']!r}: {first['msg']}"
    return " ".join(str(exc).split())


def _quiet_settings(wandb: Any, offline: bool) -> Any:
    """W&B's settings of a logger's run: no output of W&B's own on the terminal and no
    capture of the process's; offline, no system metrics sampled."""
    return wandb.Settings(silent=True, console="off", x_disable_stats=offline)


class WandbLogger(DashboardLogger):
    """Logs the run's curves to a W&B run (rank 0 only, as ``is_main`` says): the one
    ``history`` records, else a new one whose config is ``config`` (a mapping). The W&B run is
    started when the logger is made, before any training."""

    def __init__(
        self,
        run_dir: str | Path,
        history: History,
        config: dict[str, Any] | None = None,
        is_main: bool = True,
    ) -> None:
        self.run_dir, self.is_main = Path(run_dir), is_main
        self.wandb: Any = require_logger("wandb")
        self.run: Any = None
        self.owns_service = False  # started W&B in this process: tears it down at the end
        self.process_hooks: tuple[Any, Any] = (sys.exit, sys.excepthook)  # W&B wraps them
        self.record: Path | None = None  # the epochs the W&B run holds
        self.logged: set[int] = set()
        self.defined: set[str] = set()
        self.step_losses = StepLosses()
        self.finished = False
        if is_main:
            self._open(history, config)

    def _open(self, history: History, config: dict[str, Any] | None) -> None:
        wandb = self.wandb
        recorded = history.extra.get("wandb") or {}
        resumed = bool(recorded.get("id"))
        env_mode = os.environ.get("WANDB_MODE")
        offline = (env_mode or DEFAULT_MODE) in OFFLINE_MODES
        folder = recorded.get("dir") if resumed else os.environ.get("WANDB_DIR")
        project = recorded.get("project") or os.environ.get("WANDB_PROJECT") or PROJECT
        wandb_dir = Path(folder) if folder else self.run_dir
        try:
            wandb_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"log='wandb' cannot create {wandb_dir}: {exc.strerror}") from None
        self.owns_service = wandb.run is None
        try:
            if self.owns_service and offline:  # W&B's own telemetry stays off the network too
                wandb.setup(settings=wandb.Settings(mode=DEFAULT_MODE))
            self.run = wandb.init(
                project=project,
                dir=str(wandb_dir),
                name=self.run_dir.name,
                config=config,
                id=recorded.get("id"),
                resume="allow" if resumed else None,
                mode=None if env_mode else DEFAULT_MODE,
                reinit="create_new",
                settings=_quiet_settings(wandb, offline),
            )
        except (wandb.errors.Error, ValueError) as exc:  # W&B's settings: pydantic's errors
            self._teardown()
            raise ConfigError(f"log='wandb', W&B run in {wandb_dir}: {_one_line(exc)}") from None
        self.run.define_metric(EPOCH_AXIS, hidden=True)
        self.run.define_metric(STEP_AXIS, hidden=True)
        self.record = wandb_dir / "wandb" / f"pyro-vae-{self.run.id}.json"
        self.record.parent.mkdir(parents=True, exist_ok=True)
        if resumed and self.record.exists():
            self.logged = set(read_json(self.record, error=ConfigError).get("epochs", []))
        history.extra["wandb"] = {
            "id": self.run.id,
            "project": project,
            "dir": str(wandb_dir.resolve()) if folder else None,
        }

    def _log(self, row: dict[str, Any], step: int, axis: str) -> None:
        for name in row:
            if name not in self.defined and name != axis:
                self.run.define_metric(name, step_metric=axis)
                self.defined.add(name)
        self.run.log(row, step=max(step, self.run.step))

    def _steps(self, loop: Loop) -> int:
        return loop.replicas.steps_per_epoch(loop.data.source, loop.data.batch_size)

    def _log_epoch(self, loop: Loop, index: int) -> None:
        epoch = loop.history.epoch[index]
        row = {EPOCH_AXIS: epoch, **epoch_scalars(loop, index)}
        self._log(row, epoch * self._steps(loop), EPOCH_AXIS)
        self.logged.add(epoch)
        write_json(self.record, {"id": self.run.id, "epochs": sorted(self.logged)})

    def on_fit_start(self, loop: Loop) -> None:
        for index, epoch in enumerate(loop.history.epoch):  # what an earlier process left out
            if self.is_main and epoch not in self.logged:
                self._log_epoch(loop, index)

    def on_epoch_end(self, loop: Loop) -> None:
        if not self.is_main:
            return
        for step, value, _ in self.step_losses.drain():
            self._log({STEP_AXIS: step, STEP_LOSS: value}, step, STEP_AXIS)
        self._log_epoch(loop, -1)

    def on_fit_end(self, loop: Loop) -> None:
        if not self.is_main:
            return
        history, final = loop.history, loop.history.extra.get("final") or {}
        numbers = {f"final/{n}": final[n] for n in FINAL_NAMES if final.get(n) is not None}
        if history.epoch:
            epoch = history.epoch[-1]
            images = {
                f"plots/{plot.stem}": self.wandb.Image(str(plot))
                for plot in sorted(self.run_dir.glob("*.png"))
            }
            row = {EPOCH_AXIS: epoch, **numbers, **images}
            self._log(row, epoch * self._steps(loop), EPOCH_AXIS)
            self.run.summary.update(numbers)
        self.run.finish()
        self.finished = True
        self._teardown()

    def _teardown(self) -> None:
        """W&B's service process ended, if this logger started it, and the process's
        ``sys.exit`` and ``sys.excepthook`` given back (W&B's service wraps them for good)."""
        if self.owns_service:
            self.owns_service = False
            try:
                self.wandb.teardown()
            finally:
                sys.exit, sys.excepthook = self.process_hooks

    def close(self) -> None:
        if self.run is not None and not self.finished:  # an error or an interruption
            with contextlib.suppress(Exception):  # not to hide what stopped the run
                self.run.finish(exit_code=1)
            with contextlib.suppress(Exception):
                self._teardown()
