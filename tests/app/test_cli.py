import json
import shutil
from pathlib import Path

import pytest

from pyro_vae.app.cli import main
from pyro_vae.evaluate import MIN_KHAT_PARTICLES

TINY = ["--epochs", "1", "--batch-size", "256", "--quiet", "--hidden", "16", "--latent-dim", "2"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One tiny training run for the module (seeded by its config, so every copy is the run any
    test would have trained itself)."""
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", *TINY, "--out", str(out)]) == 0
    return out


@pytest.fixture
def run_dir(trained_run, tmp_path):
    """A private copy of the module's run, which the test may change."""
    return Path(shutil.copytree(trained_run, tmp_path / "run"))


def test_train_writes_a_run_folder(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(run_dir)]) == 0
    config = json.loads((run_dir / "config.json").read_text())
    assert config["epochs"] == 1 and config["model"]["latent_dim"] == 2
    history = json.loads((run_dir / "history.json").read_text())
    assert history["epoch"] == [1] and history["test_elbo"][0] < 0
    assert "test ELBO" in capsys.readouterr().out


def test_train_resume_extends_the_run(run_dir):
    assert main(["train", "--resume", str(run_dir), "--epochs", "2", "--quiet"]) == 0
    assert json.loads((run_dir / "history.json").read_text())["epoch"] == [1, 2]


def test_traced_steps_reach_the_run_of_the_fused_loss(run_dir, tmp_path):
    """--traced takes every step through Pyro's traces; the fused loss it replaces computes the
    same draws, losses and gradients, so both runs end on the same history and weights."""
    from safetensors.torch import load_file

    traced = tmp_path / "traced"
    assert main(["train", *TINY, "--out", str(traced), "--traced"]) == 0
    histories = [json.loads((d / "history.json").read_text()) for d in (run_dir, traced)]
    for history in histories:
        history.pop("seconds")
    assert histories[0] == histories[1]
    weights = [load_file(d / "model.safetensors") for d in (run_dir, traced)]
    assert weights[0].keys() == weights[1].keys()
    assert all(weights[0][k].equal(weights[1][k]) for k in weights[0])


def test_sample_writes_a_grid(run_dir, tmp_path, capsys):
    output = tmp_path / "grid.png"
    assert main(["sample", str(run_dir), "--num", "9", "--output", str(output)]) == 0
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["sample", str(run_dir), "--binary"]) == 0
    assert (run_dir / "samples-0.png").exists()


def exit_status(argv) -> int:
    """``main``'s status, whether it returns it or argparse exits with it."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


def assert_one_line_error(capsys, message):
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["train", "--dataset", "mnist", "--data-dir", "/nonexistent/mnist"],
            "--data-dir /nonexistent/mnist does not exist",
        ),
        (["train", "--resume", "/nonexistent/run"], "run folder /nonexistent/run does not exist"),
        (["sample", "/nonexistent/run"], "does not exist"),
        (["evaluate", "/nonexistent/run"], "does not exist"),
        (["train", "--epochs", "-3"], "expected a number >= 1, got -3"),
        (["train", "--batch-size", "0"], "expected a number >= 1, got 0"),
        (["train", "--seed", "-1"], "seed must be a whole number in 0..4294967295"),
        (["sample", "run", "--seed", str(2**70)], "seed must be a whole number"),
        (["train", "--elbo", "nope"], "invalid choice: 'nope'"),
        (["train", "--obs-scale", "0.1"], "it needs --likelihood gaussian"),
        (["train", "--latent2-dim", "3"], "--latent2-dim sizes the second stochastic layer"),
        (["train", "--model", "cvae", "--hidden2", "8"], "--hidden2 sizes the second"),
    ],
)
def test_user_errors_exit_2_with_one_line(argv, message, capsys):
    assert exit_status(argv) == 2
    assert_one_line_error(capsys, message)


def test_damaged_run_files_give_one_line(run_dir, capsys):
    import torch

    checkpoint = run_dir / "checkpoint.pt"
    state = torch.load(checkpoint, weights_only=True)
    cases = [
        (lambda: checkpoint.write_bytes(b"not a checkpoint"), "damaged or not a pyro-vae"),
        (lambda: checkpoint.write_bytes(b""), "damaged or not a pyro-vae"),
        (lambda: torch.save({"model": state["model"]}, checkpoint), "it lacks ['optimizer'"),
        (lambda: torch.save({**state, "model": {}}, checkpoint), "does not fit its config"),
        (lambda: (run_dir / "config.json").write_bytes(b"\xff"), "cannot read"),
        (lambda: (run_dir / "config.json").write_text("[1, 2]"), "expected a JSON object"),
    ]
    for damage, message in cases:
        damage()
        assert exit_status(["sample", str(run_dir)]) == 2
        assert_one_line_error(capsys, message)


def test_resume_refuses_to_go_back_in_epochs(run_dir, capsys):
    assert main(["train", "--resume", str(run_dir), "--epochs", "2", "--quiet"]) == 0
    capsys.readouterr()
    assert exit_status(["train", "--resume", str(run_dir), "--epochs", "1"]) == 2
    assert_one_line_error(capsys, "has already trained 2 epochs")
    assert json.loads((run_dir / "config.json").read_text())["epochs"] == 2


def test_resume_rejects_changed_flags(run_dir, capsys):
    assert main(["train", "--resume", str(run_dir), "--lr", "0.1"]) == 2
    assert "--lr cannot change on --resume" in capsys.readouterr().err


def test_argument_errors_exit_2(capsys):
    assert exit_status(["train", "--hidden", "a,b"]) == 2
    assert_one_line_error(capsys, "comma-separated")


def test_evaluate_prints_a_table_and_writes_its_files(run_dir, capsys):
    argv = ["evaluate", str(run_dir), "--particles", "30", "--limit", "12", "--quiet"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "12 datapoints, K = 30 particles" in out and "log p_K(x)" in out
    report = json.loads((run_dir / "eval-test.json").read_text())
    assert report["summary"]["num_datapoints"] == 12
    for name in ("eval-test.nc", "khat-test.png", "gap-test.png"):
        assert (run_dir / name).stat().st_size > 0
    # too few particles for k-hat: the earlier k-hat plot goes, and the message says so
    assert main(["evaluate", str(run_dir), "--particles", "5", "--limit", "3", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"not computed: PSIS needs K >= {MIN_KHAT_PARTICLES}" in out
    assert "khat-test.png" not in out
    assert not (run_dir / "khat-test.png").exists()


def test_training_reports_the_importance_weighted_estimate(run_dir):
    final = json.loads((run_dir / "history.json").read_text())["final"]
    assert final["particles"] == 100
    # log p̂_K is a tighter bound than the ELBO: the estimated gap is positive
    assert final["test_log_px"] > final["test_elbo"] and final["test_gap"] > 0
