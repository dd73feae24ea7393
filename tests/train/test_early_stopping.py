"""Early stopping on the held-out ELBO: the paired rule, a run that stops, its best weights, a
resumed run that decides as the uninterrupted one, and the refusals."""

import json
import math

import pytest
import safetensors.torch
import torch

from pyro_vae.app.cli import main
from pyro_vae.train.early_stopping import paired_improvement
from pyro_vae.util.errors import ConfigError

SMALL = ["--batch-size", "256", "--latent-dim", "2", "--hidden", "16", "--device", "cpu", "--quiet"]


def _history(run_dir):
    return json.loads((run_dir / "history.json").read_text())


def test_the_paired_standard_error_is_that_of_the_per_datapoint_differences():
    best = torch.tensor([-10.0, -20.0, -30.0, -40.0])
    current = best + torch.tensor([1.0, 2.0, 3.0, 6.0])
    mean, stderr = paired_improvement(current, best)
    assert mean == pytest.approx(3.0)
    diffs = [1.0, 2.0, 3.0, 6.0]
    sd = math.sqrt(sum((d - 3.0) ** 2 for d in diffs) / 3)
    assert stderr == pytest.approx(sd / 2)
    # the spread of the ELBOs themselves does not count: only that of their change
    assert paired_improvement(best + 0.5, best) == (pytest.approx(0.5), 0.0)


def test_a_run_that_cannot_improve_by_min_delta_stops_after_patience_epochs(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", *SMALL, "--epochs", "20", "--patience", "2", "--min-delta", "1e6"]
    assert main([*args, "--out", str(out)]) == 0
    history = _history(out)
    stopping = history["early_stopping"]
    # epoch 1 is the first best; epochs 2 and 3 do not gain a million nats: stop after 3
    assert history["epoch"] == [1, 2, 3]
    assert stopping["best_epoch"] == 1 and stopping["stopped_epoch"] == 3
    assert stopping["best_test_elbo"] == history["test_elbo"][0]
    assert history["finished_at_epoch"] == 3 and "final" in history
    assert "stopped early at epoch 3" in capsys.readouterr().out
    best = safetensors.torch.load_file(out / "best.safetensors")
    last = safetensors.torch.load_file(out / "model.safetensors")
    assert best.keys() == last.keys()
    assert any(not torch.equal(best[k], last[k]) for k in best)  # epoch 1's, not epoch 3's
    # a stopped run is complete: resuming it trains nothing
    assert main(["train", "--resume", str(out), "--epochs", "30"]) == 0
    assert "already stopped early at epoch 3; nothing to do" in capsys.readouterr().out
    assert _history(out)["epoch"] == [1, 2, 3]


def test_the_noise_aware_rule_keeps_the_best_epoch_and_a_resumed_run_stops_alike(tmp_path):
    whole, part = tmp_path / "whole", tmp_path / "part"
    args = ["train", *SMALL, "--patience", "2"]
    assert main([*args, "--epochs", "60", "--out", str(whole)]) == 0
    history = _history(whole)
    stopping = history["early_stopping"]
    stopped, best = stopping["stopped_epoch"], stopping["best_epoch"]
    assert stopped is not None and stopped < 60, "the digits run should plateau"
    assert stopped - best == 2 and history["epoch"][-1] == stopped
    assert stopping["best_test_elbo"] == history["test_elbo"][best - 1]
    # the best epoch's per-datapoint values are its held-out score's: their mean is its ELBO
    # (up to the global latents' term, of which the VAE has none)
    mean = sum(stopping["best_values"]) / len(stopping["best_values"])
    assert mean == pytest.approx(stopping["best_test_elbo"], abs=1e-4)

    # the same run, interrupted before it stops and resumed, ends on the same epoch, the same
    # numbers and the same best weights
    assert main([*args, "--epochs", str(stopped - 1), "--out", str(part)]) == 0
    assert main(["train", "--resume", str(part), "--epochs", "60", "--quiet"]) == 0
    resumed = _history(part)
    for key in ("epoch", "train_loss", "test_elbo", "early_stopping", "final"):
        assert resumed[key] == history[key], key
    for name in ("best.safetensors", "model.safetensors"):
        assert (part / name).read_bytes() == (whole / name).read_bytes(), name


def test_bad_early_stopping_options_are_one_line(tmp_path, capsys):
    assert main(["train", *SMALL, "--min-delta", "0.1", "--out", str(tmp_path / "a")]) == 2
    assert capsys.readouterr().err.strip() == (
        "pyro-vae train: error: --min-delta 0.1 is early stopping's: it needs --patience EPOCHS"
    )
    assert not (tmp_path / "a").exists()
    with pytest.raises(SystemExit) as info:
        main(["train", *SMALL, "--patience", "0", "--out", str(tmp_path / "b")])
    assert info.value.code == 2
    assert "--patience: expected a number >= 1, got 0" in capsys.readouterr().err


def test_fit_refuses_early_stopping_without_held_out_data():
    from pyro_vae import fit
    from pyro_vae.models import VAE

    with pytest.raises(ConfigError, match="patience=3 stops on the held-out ELBO: give test_data"):
        fit(VAE(4, 2, (8,)), torch.zeros(8, 4), patience=3, epochs=1, progress=False)
