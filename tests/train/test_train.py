import importlib
import json
import re
import subprocess
import sys

import pytest
import torch

from pyro_vae import VAE, ConfigError, RunOptions, TrainConfig, TrainingDiverged, fit, load_run
from pyro_vae.runs import CHECKPOINT_FILE, load_checkpoint
from pyro_vae.util.errors import CheckpointError

TINY = TrainConfig(epochs=2, batch_size=128, eval_particles=2)


def test_a_few_epochs_raise_the_test_elbo():
    history = fit(config=TINY.replace(epochs=15, batch_size=64), progress=False).history
    assert history.epoch == list(range(1, 16))
    assert all(torch.isfinite(torch.tensor(history.test_elbo)))
    # digits, 64 binary pixels: the first epoch sits near the pixel-marginal baseline
    # (about -27.5 nats); 15 epochs gain well over a nat.
    assert history.test_elbo[-1] > history.test_elbo[0] + 1.5
    assert history.train_loss[-1] < history.train_loss[0] - 1.5


@pytest.mark.parametrize(
    "estimator",
    [
        {"elbo": "trace", "particles": 2},
        {"elbo": "meanfield", "particles": 2},
        {"elbo": "dreg", "importance_samples": 3, "warmup": 30},
    ],
)
def test_resume_reaches_the_uninterrupted_result(tmp_path, estimator):
    config = TINY.replace(epochs=4, **estimator)
    full = fit(config=config, run_dir=tmp_path / "full", progress=False)
    fit(config=config.replace(epochs=2), run_dir=tmp_path / "part", progress=False)
    resumed = fit(config=config, run_dir=tmp_path / "part", resume=True, progress=False)
    for name, value in full.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
    assert resumed.history.train_loss == full.history.train_loss
    assert resumed.history.test_elbo == full.history.test_elbo
    saved = json.loads((tmp_path / "part" / "history.json").read_text())
    assert saved["epoch"] == [1, 2, 3, 4]


def test_checkpoint_round_trip(tmp_path):
    result = fit(config=TINY, run_dir=tmp_path / "run", progress=False)
    run = load_run(tmp_path / "run", device="cpu")
    assert run.config == TINY
    for name, value in result.model.state_dict().items():
        assert torch.equal(value, run.model.state_dict()[name])
    assert run.history.test_elbo == result.history.test_elbo
    for png in ("samples.png", "reconstructions.png", "latent.png", "curves.png"):
        assert (tmp_path / "run" / png).stat().st_size > 0
    assert not list((tmp_path / "run").glob(".*.tmp"))


def test_checkpoint_is_loaded_without_unpickling_code(tmp_path):
    fit(config=TINY.replace(epochs=1), run_dir=tmp_path, progress=False)
    state = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)
    assert set(state) == {"model", "optimizer", "rng", "history", "config"}
    (tmp_path / CHECKPOINT_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path)


def test_divergence_stops_with_a_message_and_keeps_the_last_good_checkpoint(tmp_path):
    model = VAE(64, latent_dim=TINY.model.latent_dim, hidden=TINY.model.hidden)

    def poison(epoch, history):
        with torch.no_grad():
            model.decoder.net[-1].bias.fill_(float("nan"))

    with pytest.raises(TrainingDiverged, match="epoch 2.*last good checkpoint \\(epoch 1\\)"):
        fit(
            model,
            config=TINY.replace(epochs=3),
            run_dir=tmp_path,
            progress=False,
            options=RunOptions(on_epoch=poison),
        )
    state = load_checkpoint(tmp_path)
    assert state["history"]["epoch"] == [1]
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_existing_run_is_not_overwritten(tmp_path):
    fit(config=TINY.replace(epochs=1), run_dir=tmp_path, progress=False)
    with pytest.raises(ConfigError, match="already holds a run"):
        fit(config=TINY, run_dir=tmp_path, progress=False)


def test_resume_refuses_a_changed_config(tmp_path):
    fit(config=TINY.replace(epochs=1), run_dir=tmp_path, progress=False)
    with pytest.raises(CheckpointError, match="differs"):
        fit(config=TINY.replace(lr=0.5), run_dir=tmp_path, resume=True, progress=False)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"binarize": "none"}, "binary data"),
        ({"dataset": "cifar"}, "dataset must be one of"),
        ({"particles": 0}, "particles must be >= 1"),
        ({"lr": -1.0}, "lr must be > 0"),
        ({"elbo": "stl", "importance_samples": 4}, "use dreg"),
        ({"warmup": -5}, "warm-up steps"),
    ],
)
def test_bad_configs(changes, message):
    with pytest.raises(ConfigError, match=message):
        fit(config=TINY.replace(**changes), progress=False)


@pytest.mark.parametrize(
    "keywords, named",
    [
        ({"lr": "fast"}, "lr must be a number, got 'fast'"),
        ({"batch_size": 2.5}, "batch_size must be an integer >= 1, got 2.5"),
        ({"batch_size": True}, "batch_size must be an integer >= 1, got True"),
        ({"epochs": 1.7}, "epochs must be an integer >= 1, got 1.7"),
    ],
)
def test_fit_refuses_keywords_of_the_wrong_kind_before_it_starts(tmp_path, capsys, keywords, named):
    from user_models import fa_data, make_fa

    data = torch.as_tensor(fa_data(32))
    with pytest.raises(ConfigError, match=f"^{re.escape(named)}$"):
        fit(make_fa(), data, run_dir=tmp_path / "run", progress=True, **keywords)
    assert not (tmp_path / "run").exists()
    assert capsys.readouterr().err == ""  # no progress bar started


def test_warmup_ramps_beta_over_optimizer_steps(monkeypatch):
    train_module = importlib.import_module("pyro_vae.train.engine")
    seen = []
    real = train_module.make_estimator

    def recording(name, *args, **kwargs):
        class Recording(type(real(name, *args, **kwargs))):  # a subclass: traced, never fused
            def differentiable_loss(self, *a, **k):
                seen.append(self.beta)
                return super().differentiable_loss(*a, **k)

        options = kwargs.pop("options", None) or {}  # the estimator's own keywords
        return Recording(*args, **kwargs, **options)

    monkeypatch.setattr(train_module, "make_estimator", recording)
    config = TINY.replace(epochs=2, batch_size=300, warmup=5, warmup_start=0.1, beta=0.6)
    fit(config=config, progress=False)
    # 1497 images: 5 steps an epoch
    assert seen == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5] + [0.6] * 5)


def test_cuda_request_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        fit(config=TINY.replace(device="cuda"), progress=False)


@pytest.mark.cuda
def test_training_runs_on_the_gpu(tmp_path):
    result = fit(config=TINY.replace(device="cuda"), run_dir=tmp_path, progress=False)
    assert all(p.device.type == "cuda" for p in result.model.parameters())
    assert result.history.test_elbo[-1] > result.history.test_elbo[0] - 1.0
    run = load_run(tmp_path, device="cpu")
    assert all(p.device.type == "cpu" for p in run.model.parameters())


def test_the_model_side_imports_no_estimator():
    code = (
        "import sys, pyro_vae.models.vae, pyro_vae.data.builtin; "
        "print('pyro_vae.infer' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_run_options_are_one_object_and_the_documented_ones_keywords_too(tmp_path):
    calls = []
    options = RunOptions(
        run_dir=tmp_path / "run",
        progress=False,
        on_epoch=lambda epoch, history: calls.append(epoch),
    )
    by_object = fit(config=TINY.replace(epochs=1), options=options)
    by_keywords = fit(config=TINY.replace(epochs=1), run_dir=tmp_path / "again", progress=False)
    assert calls == [1] and (tmp_path / "run" / "history.json").is_file()
    assert by_object.history.train_loss == by_keywords.history.train_loss
    with pytest.raises(ConfigError, match=r"\['download'\].*options=RunOptions"):
        fit(config=TINY, download=True)
