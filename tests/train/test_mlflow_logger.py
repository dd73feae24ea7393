"""The MLflow logger: the metrics, read back with ``MlflowClient``, are the history's, the params
config.json's, the artifacts the run folder's plots; a resumed run continues the same MLflow run
without logging an epoch twice; the store is MLflow's variable, and one that lacks the recorded
run, or a store without the logger, is refused in one line. The per-step hook: each step's
loss, eager or compiled."""

import json
import math

import pytest
from user_models import FactorAnalysis, fa_data

from pyro_vae import fit, load_digits
from pyro_vae.app.cli import main
from pyro_vae.train import Callback

SMALL = ["--batch-size", "256", "--latent-dim", "2", "--hidden", "16", "--device", "cpu", "--quiet"]
EPOCH_METRICS = {"train/loss": "train_loss", "test/elbo": "test_elbo", "train/seconds": "seconds"}


@pytest.fixture
def store(monkeypatch):
    """MlflowClient, with the environment of a user who set none of MLflow's variables."""
    mlflow = pytest.importorskip("mlflow")
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # restored after the test
    return mlflow.tracking.MlflowClient


def _steps_per_epoch(batch_size=256):
    return math.ceil(len(load_digits().train.images) / batch_size)


def _run(client_class, out):
    """The client of the run folder's store, its MLflow run and the run folder's history."""
    history = json.loads((out / "history.json").read_text())
    client = client_class(tracking_uri=history["mlflow"]["tracking_uri"])
    return client, client.get_run(history["mlflow"]["run_id"]), history


def _points(client, run, name):
    return [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, name)]


def _nested(params):
    """The params as a mapping again: ``outer.inner`` keys nested, JSON values decoded."""
    nested = {}
    for key, value in params.items():
        *outer, last = key.split(".")
        node = nested
        for part in outer:
            node = node.setdefault(part, {})
        try:
            node[last] = json.loads(value)
        except ValueError:  # a string of the config, as it is
            node[last] = value
    return nested


def test_the_runs_metrics_params_and_plots_are_the_run_folders(tmp_path, store):
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--epochs", "2", "--log", "mlflow", "--out", str(out)]) == 0
    client, run, history = _run(store, out)
    assert history["mlflow"]["tracking_uri"] == (tmp_path / "mlruns").as_uri()  # the default
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    for name, key in EPOCH_METRICS.items():
        assert _points(client, run, name) == list(zip(history["epoch"], history[key]))
    assert _points(client, run, "train/beta") == [(1, 1.0), (2, 1.0)]
    assert _points(client, run, "train/lr") == [(1, 3e-3), (2, 3e-3)]
    final = history["final"]
    assert _points(client, run, "final/test_log_px") == [(2, final["test_log_px"])]
    steps = _points(client, run, "train/step_loss")
    assert [step for step, _ in steps] == list(range(1, 2 * _steps_per_epoch() + 1))
    config = json.loads((out / "config.json").read_text())
    assert _nested(run.data.params) == config
    plots = sorted(p.name for p in out.glob("*.png"))
    assert len(plots) == 4
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id)) == plots


def test_a_resumed_run_continues_the_same_mlflow_run_without_a_step_twice(tmp_path, store):
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--epochs", "2", "--log", "mlflow", "--out", str(out)]) == 0
    first = json.loads((out / "history.json").read_text())["mlflow"]
    assert main(["train", "--resume", str(out), "--epochs", "3", "--log", "mlflow"]) == 0
    client, run, history = _run(store, out)
    assert history["mlflow"] == first
    assert _points(client, run, "train/loss") == list(zip([1, 2, 3], history["train_loss"]))
    steps = [step for step, _ in _points(client, run, "train/step_loss")]
    assert steps == list(range(1, 3 * _steps_per_epoch() + 1))
    assert [s for s, _ in _points(client, run, "final/test_log_px")] == [2, 3]
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_a_run_logged_only_from_its_resume_gets_its_earlier_epochs(tmp_path, store):
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--epochs", "2", "--out", str(out)]) == 0
    uri = (tmp_path / "elsewhere").as_uri()
    assert (
        main(
            ["train", "--resume", str(out), "--epochs", "3", "--log", "mlflow"]
            + [
                "--log-uri",
                uri,
            ]
        )
        == 0
    )
    client, run, history = _run(store, out)
    assert history["mlflow"]["tracking_uri"] == uri
    assert _points(client, run, "train/loss") == list(zip([1, 2, 3], history["train_loss"]))
    steps = [step for step, _ in _points(client, run, "train/step_loss")]  # epoch 3's alone
    assert steps == list(range(2 * _steps_per_epoch() + 1, 3 * _steps_per_epoch() + 1))


def test_the_tracking_store_is_mlflows_variable_and_a_run_not_in_it_is_refused(
    tmp_path, store, monkeypatch, capsys
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", str(tmp_path / "server"))
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "digits")
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--epochs", "1", "--log", "mlflow", "--out", str(out)]) == 0
    client, run, history = _run(store, out)
    assert history["mlflow"]["tracking_uri"] == (tmp_path / "server").as_uri()
    assert client.get_experiment(run.info.experiment_id).name == "digits"
    before = (out / "history.json").read_bytes()
    other = (tmp_path / "other").as_uri()
    resume = ["train", "--resume", str(out), "--epochs", "2", "--log", "mlflow"]
    capsys.readouterr()
    assert main([*resume, "--log-uri", other]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"pyro-vae train: error: {out} was logged to the MLflow run ")
    assert err.endswith(f"which {other} does not hold: give --log-uri URI of its store")
    assert (out / "history.json").read_bytes() == before  # refused before any epoch


def test_a_store_mlflow_cannot_open_is_one_line_and_leaves_no_run_folder(tmp_path, store, capsys):
    out = tmp_path / "run"
    args = ["train", *SMALL, "--log", "mlflow", "--log-uri", "nosuchscheme://x", "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith(
        "pyro-vae train: error: --log mlflow, tracking store nosuchscheme://x: "
    )
    assert not out.exists()


def test_a_tracking_store_without_the_mlflow_logger_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--log-uri", "mlruns", "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == (
        "pyro-vae train: error: --log-uri mlruns is an MLflow tracking store: it needs --log mlflow"
    )
    assert not out.exists()


class StepRecorder(Callback):
    def __init__(self):
        self.steps, self.losses = [], []

    def on_step_end(self, loop, step, loss):
        self.steps.append(step)
        self.losses.append(float(loss))


@pytest.mark.parametrize("compile", [False, True])
def test_each_steps_loss_reaches_the_step_hook(compile):
    recorder = StepRecorder()
    result = fit(
        FactorAnalysis(),
        fa_data(64),
        batch_size=32,
        epochs=2,
        lr=1e-2,
        final_particles=0,
        progress=False,
        compile=compile,
        callbacks=[recorder],
    )
    assert recorder.steps == [1, 2, 3, 4]
    # equal batches: an epoch's mean loss is the mean of its steps'
    for epoch, loss in enumerate(result.history.train_loss):
        assert sum(recorder.losses[2 * epoch : 2 * epoch + 2]) / 2 == pytest.approx(loss, rel=1e-6)


def test_a_callback_without_a_step_hook_is_not_called_per_step(monkeypatch):
    def called(self, loop, step, loss):
        raise AssertionError("on_step_end called for a callback that does not define it")

    monkeypatch.setattr(Callback, "on_step_end", called)
    result = fit(
        FactorAnalysis(),
        fa_data(64),
        batch_size=32,
        epochs=2,
        final_particles=0,
        progress=False,
        callbacks=[Callback()],
    )
    assert result.history.epoch == [1, 2]


def test_the_held_out_estimates_are_metrics_at_their_epochs(tmp_path, store):
    out = tmp_path / "run"
    run = ["train", *SMALL, "--epochs", "2", "--estimate-every", "1", "--log", "mlflow"]
    assert main([*run, "--out", str(out)]) == 0
    client, mlflow_run, history = _run(store, out)
    estimates = history["estimates"][1:]  # epoch 0's is in the history alone
    for name in ("log_px", "gap", "ess", "rate", "distortion_stderr"):
        expected = [(e["epoch"], e[name]) for e in estimates]
        assert _points(client, mlflow_run, f"test/{name}") == expected
