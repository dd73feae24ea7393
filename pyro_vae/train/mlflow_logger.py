"""Training curves in an MLflow tracking store: a :class:`~pyro_vae.train.Callback` logging the
scalars of :mod:`pyro_vae.train.loggers` (the same names: per epoch, the epoch as the step;
per step ``train/step_loss``; ``final/NAME`` at the last epoch), the run's config as params
(nested entries as ``model.latent_dim``, each value as config.json writes it) and the run
folder's plots as artifacts, through ``MlflowClient`` (the optional ``mlflow-skinny`` package,
imported only when a logger is made).

The store: ``tracking_uri`` when given; for a resumed run the one it was logged to; else
``MLFLOW_TRACKING_URI``; else a file store in ``mlruns`` beside the run folder (the skinny
package has no database backend; MLflow's own ``MLFLOW_ALLOW_FILE_STORE`` is set to ``true``
for a file store unless it is set). The experiment is ``MLFLOW_EXPERIMENT_NAME`` (or
``MLFLOW_EXPERIMENT_ID``), else ``pyro-vae``; the MLflow run is named after the run folder.
Its id and store are kept in the history (``extra["mlflow"]``, saved with every checkpoint),
so a resumed run continues the same MLflow run, logging only the epochs it lacks.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

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

#: the experiment of runs logged without ``MLFLOW_EXPERIMENT_NAME`` or ``MLFLOW_EXPERIMENT_ID``
EXPERIMENT = "pyro-vae"
#: the default file store's folder, beside the run folder
STORE_DIR = "mlruns"
#: the most metrics sent in one request (MLflow's own limit is 1000)
BATCH = 1000


def flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """The config's entries as MLflow params: nested mappings as ``outer.inner`` keys (an empty
    one as ``{}``), strings as they are, every other value as its JSON."""
    params: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            params.update(flat_params(value, f"{prefix}{key}."))
        else:
            params[f"{prefix}{key}"] = value if isinstance(value, str) else json.dumps(value)
    return params


def local_uri(uri: str) -> str:
    """``uri`` with a local path (no scheme, or ``file:``) made absolute, so a resumed run
    finds its store from any working directory."""
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file") and not parsed.netloc:
        return Path(parsed.path or uri).expanduser().resolve().as_uri()
    return uri


class MLflowLogger(DashboardLogger):
    """Logs the run's curves to an MLflow run (rank 0 only, as ``is_main`` says): the one
    ``history`` records, else a new one whose params are ``config`` (a mapping). The store is
    reached, and the run created or found, when the logger is made, before any training."""

    def __init__(
        self,
        run_dir: str | Path,
        history: History,
        config: dict[str, Any] | None = None,
        tracking_uri: str | None = None,
        is_main: bool = True,
    ) -> None:
        self.run_dir, self.is_main = Path(run_dir), is_main
        self.client_class = require_logger("mlflow")
        self.client: Any = None
        self.uri: str | None = None  # the tracking store's
        self.run_id: str | None = None
        self.logged: set[int] = set()  # the epochs the MLflow run holds
        self.step_losses = StepLosses()
        self.finished = False
        if is_main:
            self._open(history, config, tracking_uri)

    def _call(self, method: str | None, *args: Any, **kwargs: Any) -> Any:
        """The client's ``method`` (``None``: make the client for the store ``args[0]``);
        MLflow's refusal as one line."""
        from mlflow.exceptions import MlflowException

        try:
            if method is None:
                self.client = self.client_class(tracking_uri=args[0])
                return self.client
            return getattr(self.client, method)(*args, **kwargs)
        except MlflowException as exc:
            message = " ".join(str(exc.message).split())
            raise ConfigError(f"log='mlflow', tracking store {self.uri}: {message}") from None

    def _store(self, given: str | None, recorded: dict[str, Any]) -> str:
        uri = (
            given
            or recorded.get("tracking_uri")
            or os.environ.get("MLFLOW_TRACKING_URI")
            or str(self.run_dir.resolve().parent / STORE_DIR)
        )
        uri = local_uri(uri)
        if uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        return uri

    def _experiment_id(self) -> str:
        given = os.environ.get("MLFLOW_EXPERIMENT_ID")
        if given:
            return given
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT
        experiment = self._call("get_experiment_by_name", name)
        if experiment is not None:
            return experiment.experiment_id
        return self._call("create_experiment", name)

    def _open(self, history: History, config: dict[str, Any] | None, given: str | None) -> None:
        recorded = history.extra.get("mlflow") or {}
        uri = self.uri = self._store(given, recorded)
        self._call(None, uri)
        if recorded.get("run_id"):
            self.run_id = recorded["run_id"]
            try:
                run = self.client.get_run(self.run_id)
            except Exception:  # any store's "not found", or a store that cannot be reached
                run = None
            if run is None or run.info.lifecycle_stage != "active":
                raise ConfigError(
                    f"{self.run_dir} was logged to the MLflow run {self.run_id} in "
                    f"{recorded.get('tracking_uri')}, which {uri} does not hold: give "
                    "log_uri=URI of its store"
                )
            self._call("update_run", self.run_id, status="RUNNING")
            points = self._call("get_metric_history", self.run_id, "train/loss")
            self.logged = {metric.step for metric in points}
        else:
            tags = {"pyro_vae.run_dir": str(self.run_dir.resolve())}
            run = self._call(
                "create_run", self._experiment_id(), run_name=self.run_dir.name, tags=tags
            )
            self.run_id = run.info.run_id
            if config is not None:
                self._params(flat_params(config))
        history.extra["mlflow"] = {"tracking_uri": uri, "run_id": self.run_id}

    def on_fit_start(self, loop: Loop) -> None:
        for index, epoch in enumerate(loop.history.epoch):  # what an earlier process left out
            if self.is_main and epoch not in self.logged:
                self._log_epoch(loop, index)

    def _params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(key, value) for key, value in params.items()]
        for start in range(0, len(items), 100):  # MLflow takes 100 params a request
            self._call("log_batch", self.run_id, params=items[start : start + 100])

    def _metrics(self, points: list[tuple[str, float, int, float]]) -> None:
        """(name, value, step, wall-clock time) for each point."""
        from mlflow.entities import Metric

        metrics = [Metric(name, value, int(t * 1000), step) for name, value, step, t in points]
        for start in range(0, len(metrics), BATCH):
            self._call("log_batch", self.run_id, metrics=metrics[start : start + BATCH])

    def _log_epoch(self, loop: Loop, index: int) -> None:
        epoch, now = loop.history.epoch[index], time.time()
        points = [(name, v, epoch, now) for name, v in epoch_scalars(loop, index).items()]
        self._metrics(points)
        self.logged.add(epoch)

    def on_epoch_end(self, loop: Loop) -> None:
        if not self.is_main:
            return
        steps = self.step_losses.drain()
        self._metrics([(STEP_LOSS, value, step, t) for step, value, t in steps])
        self._log_epoch(loop, -1)

    def on_fit_end(self, loop: Loop) -> None:
        if not self.is_main:
            return
        final = loop.history.extra.get("final")
        if final and loop.history.epoch:
            step, now = loop.history.epoch[-1], time.time()
            self._metrics(
                [
                    (f"final/{n}", final[n], step, now)
                    for n in FINAL_NAMES
                    if final.get(n) is not None
                ]
            )
        for plot in sorted(self.run_dir.glob("*.png")):
            self._call("log_artifact", self.run_id, str(plot))
        self._call("set_terminated", self.run_id, "FINISHED")
        self.finished = True

    def close(self) -> None:
        if self.run_id is not None and not self.finished:  # an error or an interruption
            with contextlib.suppress(Exception):  # not to hide what stopped the run
                self.client.set_terminated(self.run_id, "FAILED")
