"""The TensorBoard logger: the event file's scalars, read back with TensorBoard's own reader,
are the history's, and each step's loss is there once; a resumed run's curves are the
uninterrupted run's; without its package, a logger (TensorBoard's, MLflow's, W&B's) is one line
saying what to install."""

import json
import math

import pytest

from pyro_vae.app.cli import main

SMALL = ["--batch-size", "256", "--latent-dim", "2", "--hidden", "16", "--device", "cpu", "--quiet"]


def _steps_trained(epochs):
    from pyro_vae import load_digits

    return list(range(1, epochs * math.ceil(len(load_digits().train.images) / 256) + 1))


def _scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def test_the_event_files_scalars_are_the_historys(tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--epochs", "3", "--log", "tensorboard", "--out", str(out)]) == 0
    history = json.loads((out / "history.json").read_text())
    scalars = _scalars(out / "tensorboard")
    for tag, key in (("train/loss", "train_loss"), ("test/elbo", "test_elbo")):
        steps, values = zip(*scalars[tag])
        assert list(steps) == history["epoch"]
        assert list(values) == pytest.approx(history[key], rel=1e-6)  # float32 in the file
    assert [v for _, v in scalars["train/beta"]] == [1.0, 1.0, 1.0]
    final = history["final"]
    assert scalars["final/test_log_px"] == [(3, pytest.approx(final["test_log_px"], rel=1e-6))]
    steps = _scalars(out / "tensorboard" / "steps")["train/step_loss"]
    assert [step for step, _ in steps] == _steps_trained(3)


def test_a_resumed_runs_curves_are_those_of_its_history(tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    logged = ["train", *SMALL, "--log", "tensorboard"]
    assert main([*logged, "--epochs", "2", "--out", str(out)]) == 0
    assert main(["train", "--resume", str(out), "--epochs", "4", "--log", "tensorboard"]) == 0
    history = json.loads((out / "history.json").read_text())
    steps, values = zip(*_scalars(out / "tensorboard")["train/loss"])
    assert list(steps) == [1, 2, 3, 4]
    assert list(values) == pytest.approx(history["train_loss"], rel=1e-6)
    steps = _scalars(out / "tensorboard" / "steps")["train/step_loss"]
    assert [step for step, _ in steps] == _steps_trained(4)


@pytest.mark.parametrize(
    "name, modules",
    [
        ("tensorboard", ["torch.utils.tensorboard"]),
        ("mlflow", ["mlflow", "mlflow.tracking"]),
        ("wandb", ["wandb"]),
    ],
)
def test_without_the_package_the_logger_is_one_line(name, modules, tmp_path, monkeypatch, capsys):
    import sys

    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)  # import fails
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--epochs", "1", "--log", name, "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"pyro-vae train: error: --log {name} needs the {name} package: "
        f"pip install 'pyro-vae[{name}]'"
    )
    assert not out.exists()  # refused before the run folder


def test_a_run_resumed_only_for_its_final_estimate_keeps_its_curves(tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    args = ["train", *SMALL, "--log", "tensorboard", "--patience", "1", "--min-delta", "1e6"]
    assert main([*args, "--epochs", "20", "--out", str(out)]) == 0  # stops after epoch 2
    history_file = out / "history.json"
    history = json.loads(history_file.read_text())
    del history["finished_at_epoch"]  # as if killed before its end mark was written
    history_file.write_text(json.dumps(history))
    assert main(["train", "--resume", str(out), "--epochs", "20", "--log", "tensorboard"]) == 0
    scalars = _scalars(out / "tensorboard")
    assert [step for step, _ in scalars["train/loss"]] == [1, 2]  # no epoch trained, none lost
    assert [step for step, _ in scalars["final/test_log_px"]] == [2, 2]


def test_the_held_out_estimates_are_logged_at_their_epochs(tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    run = ["train", *SMALL, "--epochs", "4", "--estimate-every", "2", "--log", "tensorboard"]
    assert main([*run, "--out", str(out)]) == 0
    estimates = json.loads((out / "history.json").read_text())["estimates"]
    assert [entry["epoch"] for entry in estimates] == [0, 2, 4]
    scalars = _scalars(out / "tensorboard")
    for name in ("log_px", "log_px_stderr", "gap", "ess", "khat_bad", "rate", "distortion"):
        expected = [(e["epoch"], pytest.approx(e[name], rel=1e-6, abs=1e-7)) for e in estimates]
        assert scalars[f"test/{name}"] == expected[1:]  # epoch 0's is in the history alone


def test_the_plots_are_images_and_the_config_the_final_numbers_hyperparameters(tmp_path):
    pytest.importorskip("tensorboard")
    from matplotlib.image import imread
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    out = tmp_path / "run"
    assert main(["train", *SMALL, "--epochs", "2", "--log", "tensorboard", "--out", str(out)]) == 0
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    plots = sorted(out.glob("*.png"))
    assert sorted(events.Tags()["images"]) == sorted(f"plots/{p.stem}" for p in plots)
    for plot in plots:
        (image,) = events.Images(f"plots/{plot.stem}")
        height, width = imread(plot).shape[:2]
        assert (image.step, image.height, image.width) == (2, height, width)
    hparams = EventAccumulator(str(out / "tensorboard" / "hparams"))
    hparams.Reload()
    content = hparams.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    logged = start.session_start_info.hparams
    config = json.loads((out / "config.json").read_text())
    assert logged["lr"].number_value == config["lr"]
    assert logged["elbo"].string_value == config["elbo"]
    assert logged["model.latent_dim"].number_value == config["model"]["latent_dim"]
    assert logged["model.hidden"].string_value == json.dumps(config["model"]["hidden"])
    final = json.loads((out / "history.json").read_text())["final"]
    (point,) = hparams.Scalars("final/test_log_px")
    assert point.value == pytest.approx(final["test_log_px"], rel=1e-6)


def test_a_new_event_file_sorts_after_those_in_the_folder(tmp_path):
    """TensorBoard reads event files in name order: one opened in the same second as the newest
    (the same process resuming, ``...PID.10`` < ``...PID.9``) waits for the next second."""
    import time

    from pyro_vae.train.loggers import after_existing_event_files

    stamp = int(time.time())
    (tmp_path / f"events.out.tfevents.{stamp}.host.7.9").write_bytes(b"")
    after_existing_event_files(tmp_path)
    assert int(time.time()) > stamp
    after_existing_event_files(tmp_path / "absent")  # no files: nothing to wait for
