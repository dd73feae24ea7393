"""benchmarks/beta_sweep.py: one run per β, its rate and distortion, the plane, refusals."""

from __future__ import annotations

import json

import pytest
import torch
from benchmark_loader import load_benchmark

from pyro_vae.data import images

TINY = ["--epochs", "2", "--limit", "30", "--rd-particles", "2", "--particles", "5"]
SMALL = ["--hidden", "16", "--latent-dim", "3"]


@pytest.fixture
def sweep(monkeypatch):
    return load_benchmark("beta_sweep", monkeypatch)


def test_a_larger_beta_buys_a_lower_rate(sweep, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert sweep.main(["--beta", "0.1,10", *TINY, *SMALL, "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    low, high = results["runs"]
    assert (low["beta"], high["beta"]) == (0.1, 10.0)
    for run in results["runs"]:
        assert run["rate"]["mean"] + run["distortion"]["mean"] == pytest.approx(
            -run["elbo"]["mean"]
        )
        assert (out / f"beta-{run['beta']:g}" / "eval-test.json").exists()
    assert high["rate"]["mean"] < low["rate"]["mean"]
    assert high["active_units"] <= low["active_units"]
    assert (out / "rd_plane.png").stat().st_size > 0
    assert "beta 10: R" in capsys.readouterr().err


def test_rate_plus_distortion_is_the_evaluators_elbo_within_its_error(sweep, tmp_path):
    """R + D against the evaluator's ELBO (the mean log-weight of other draws) on the same
    images: their paired difference lies within 3 of its standard errors for each β, and the
    two estimates are not the same numbers; the rate falls from β = 0.3 to β = 3."""
    out = tmp_path / "sweep"
    argv = ["--beta", "0.3,3", "--epochs", "3", "--limit", "100", "--particles", "20"]
    assert sweep.main([*argv, "--rd-particles", "10", "--out", str(out)]) == 0
    low, high = json.loads((out / "results.json").read_text())["runs"]
    assert high["rate"]["mean"] < low["rate"]["mean"]
    assert high["distortion"]["mean"] > low["distortion"]["mean"]
    for run in (low, high):
        difference = run["elbo_difference"]
        assert 0 < difference["stderr"] < 1
        assert abs(difference["mean"]) < 3 * difference["stderr"], run
        gap = run["elbo_evaluator"]["mean"] - run["elbo"]["mean"]
        assert gap == pytest.approx(difference["mean"]) and gap != 0


def fake_mnist(data_dir=None, download=False):
    """48 training and 30 test images of random intensities, 784 pixels, in place of MNIST."""
    generator = torch.Generator().manual_seed(0)
    train = torch.rand(48, 784, generator=generator) ** 3
    test = torch.rand(30, 784, generator=generator) ** 3
    labels = torch.zeros(48).long(), torch.zeros(30).long()
    return images.Dataset(
        "mnist", images.Split(train, labels[0]), images.Split(test, labels[1]), (28, 28), 10
    )


def test_mnist_runs_record_their_dataset_and_folder(sweep, tmp_path, monkeypatch):
    """--data-dir trains and scores on MNIST (a fake here) and the runs record it."""
    monkeypatch.setattr(images, "load_mnist", fake_mnist)
    out = tmp_path / "sweep"
    argv = ["--data-dir", str(tmp_path), "--beta", "1", *TINY, *SMALL, "--out", str(out)]
    assert sweep.main(argv) == 0
    (run,) = json.loads((out / "results.json").read_text())["runs"]
    config = json.loads((out / "beta-1" / "config.json").read_text())
    assert (config["dataset"], config["data_dir"]) == ("mnist", str(tmp_path))
    assert run["rate"]["mean"] > 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dataset", "mnist"], "--dataset mnist needs --data-dir DIR"),
        (["--dataset", "digits", "--data-dir", "d"], "--data-dir is MNIST's folder"),
    ],
)
def test_mnist_needs_its_folder(sweep, tmp_path, capsys, argv, message):
    out = tmp_path / "sweep"
    with pytest.raises(SystemExit) as exit_:
        sweep.main([*argv, "--out", str(out)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize(
    "beta, message",
    [("0,1", "every beta must be a number > 0, got '0'"), ("a", "got 'a'"), ("1,1", "twice")],
)
def test_bad_betas_are_one_line_and_write_nothing(sweep, tmp_path, capsys, beta, message):
    out = tmp_path / "sweep"
    with pytest.raises(SystemExit) as exit_:
        sweep.main(["--beta", beta, "--out", str(out)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_an_existing_run_folder_is_refused_before_training(sweep, tmp_path, capsys):
    out = tmp_path / "sweep"
    (out / "beta-3").mkdir(parents=True)
    with pytest.raises(SystemExit) as exit_:
        sweep.main(["--beta", "1,3", "--out", str(out)])
    assert exit_.value.code == 2
    assert "exist already" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["beta-3"]
