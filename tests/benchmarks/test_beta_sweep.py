"""benchmarks/beta_sweep.py: one run per β, its rate and distortion, the plane, refusals."""

from __future__ import annotations

import json

import pytest
from benchmark_loader import load_benchmark

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
