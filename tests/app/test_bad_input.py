"""Bad input is one line and exit status 2 with nothing written: the user's code that fails
(named by file and line), files that are not what they claim, data outside the likelihood's
support, options that would do nothing, sizes the machine cannot hold and work that would
take longer than the bound (timed on an injected clock, never the wall clock)."""

import argparse
import io
import itertools
import json
import os
import pickle
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_calls import one_line, status
from tiny_runs import TINY

from pyro_vae.app.cli import main
from pyro_vae.app.options import check_data_dir
from pyro_vae.util import budget

USER_MODELS = Path(__file__).resolve().parents[1] / "support" / "user_models.py"
HUGE = "1000000000"

PAIR = """
import sys
import pyro, pyro.distributions as dist, torch
from torch import nn


class Pair(nn.Module):
    def __init__(self, fail=None):
        super().__init__()
        self.dec, self.enc, self.fail = nn.Linear(2, 5), nn.Linear(5, 4), fail

    def model(self, x):
        pyro.module("pair", self)
        if self.fail is not None:
            raise self.fail
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], 2), 1.).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.dec(z)).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("pair", self)
        h = self.enc(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(h[:, :2], h[:, 2:].exp()).to_event(1))


def make():
    return Pair()


def exits():
    return Pair(SystemExit(0))


def interrupted():
    return Pair(KeyboardInterrupt())


def raises():
    raise ValueError("no pair today")


def data_raises():
    raise RuntimeError("the data are elsewhere")


class Lying(torch.utils.data.Dataset):
    def __len__(self):
        return 100

    def __getitem__(self, index):
        if index >= 10:
            raise IndexError(f"no row {index}")
        return torch.zeros(5)


def lying():
    return Lying()


class Ragged(torch.utils.data.Dataset):
    def __len__(self):
        return 20

    def __getitem__(self, index):
        return torch.zeros(5 if index % 2 else 4)


def ragged():
    return Ragged()


def not_finite():
    return torch.full((10, 5), float("nan"))
"""


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A user's pair file and binary data for it."""
    root = tmp_path_factory.mktemp("user")
    (root / "pair.py").write_text(PAIR)
    rng = np.random.default_rng(0)
    np.savez(root / "binary.npz", x=(rng.random((64, 5)) > 0.5).astype(np.float32))
    return root


@pytest.fixture
def ticking_clock(monkeypatch):
    """The budget's clock, advancing one second per reading."""
    ticks = itertools.count()
    monkeypatch.setattr(budget, "clock", lambda: float(next(ticks)))


# --- the user's code ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "source, function, expected",
    [
        ("def make(:\n", "make", r"bad.py:1: cannot load .* SyntaxError"),
        ("\x00\x01 not python", "make", "cannot load .* as Python"),
        (
            "def make():\n    raise ValueError('no pair today')\n",
            "make",
            r"bad.py:2: ValueError: no pair today",
        ),
        ("import sys\n\ndef make():\n    sys.exit(0)\n", "make", r"bad.py:4: .*SystemExit\(0\)"),
        ("def make():\n    return input()\n", "make", r"bad.py:2: EOFError"),
    ],
)
def test_a_factory_that_fails_is_one_line_naming_its_file_and_line(
    tmp_path, capsys, files, source, function, expected, monkeypatch
):
    import re

    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # input() meets the end of its file
    factory = tmp_path / "bad.py"
    factory.write_text(source)
    out = tmp_path / "run"
    assert (
        status(
            [
                "train",
                "--model-factory",
                f"{factory}:{function}",
                "--data",
                files / "binary.npz",
                "--out",
                out,
                "--quiet",
            ]
        )
        == 2
    )
    assert re.search(expected, one_line(capsys))
    assert not out.exists()


@pytest.mark.parametrize("spec", ["os:abort", "builtins:input", "os.path:join", "torch:zeros"])
def test_factories_of_pythons_own_library_are_refused(tmp_path, capsys, files, spec):
    out = tmp_path / "run"
    assert (
        status(
            [
                "train",
                "--model-factory",
                spec,
                "--data",
                files / "binary.npz",
                "--out",
                out,
                "--quiet",
            ]
        )
        == 2
    )
    assert "names a function of Python's standard library or a built-in" in one_line(capsys)
    assert not out.exists()


@pytest.mark.parametrize(
    "factory, data, expected, code",
    [
        ("exits", "binary.npz", r"pair.py:\d+: the user's code raised SystemExit\(0\)", 2),
        ("interrupted", "binary.npz", r"interrupted in .*pair.py:\d+$", 130),
        ("make", "pair.py:data_raises", r"pair.py:\d+: RuntimeError: the data are elsewhere", 2),
        ("make", "pair.py:lying", r"pair.py:\d+: IndexError: no row 1\d", 2),
        ("make", "pair.py:ragged", r"cannot collate a batch of the Ragged: stack expects", 2),
        ("make", "pair.py:not_finite", r"pair.py:not_finite: the array holds NaN in row 0", 2),
    ],
)
def test_the_users_model_and_data_functions_fail_in_one_line(
    tmp_path, capsys, files, factory, data, expected, code
):
    import re

    out = tmp_path / "run"
    assert (
        status(
            [
                "train",
                "--model-factory",
                f"{files / 'pair.py'}:{factory}",
                "--data",
                files / data,
                "--out",
                out,
                "--quiet",
                "--batch-size",
                "32",
            ]
        )
        == code
    )
    assert re.search(expected, one_line(capsys))
    assert not out.exists()


def test_a_library_class_called_without_its_arguments_is_one_line(tmp_path, capsys, files):
    out = tmp_path / "run"
    assert (
        status(
            [
                "train",
                "--model-factory",
                "torch.nn:Linear",
                "--data",
                files / "binary.npz",
                "--out",
                out,
                "--quiet",
            ]
        )
        == 2
    )
    assert one_line(capsys).startswith(
        "pyro-vae train: error: calling torch.nn:Linear failed: TypeError: "
    )
    assert not out.exists()


def test_data_outside_the_likelihoods_support_are_named_in_one_line(tmp_path, capsys, files):
    x = np.zeros((64, 5), dtype=np.float32)
    x[0, 0], x[1, 1] = 2.0, -1.0
    np.savez(tmp_path / "bad.npz", x=x)
    out = tmp_path / "run"
    assert (
        status(
            [
                "train",
                "--model-factory",
                f"{files / 'pair.py'}:make",
                "--data",
                tmp_path / "bad.npz",
                "--out",
                out,
                "--quiet",
            ]
        )
        == 2
    )
    line = one_line(capsys)
    assert (
        "values -1, 2 outside {0, 1}, the support of the Bernoulli likelihood at the "
        "observed site 'x'"
    ) in line and "2 of 320 entries" in line, line
    assert not out.exists()


def test_values_outside_the_support_in_a_later_batch_name_their_row(tmp_path, capsys, files):
    """Every batch is checked, not the first alone: train --data, --test-data, evaluate --data."""
    x = np.zeros((160, 5), dtype=np.float32)
    x[150, 3] = 2.0
    np.savez(tmp_path / "late.npz", x=x)
    pair, good, late = f"{files / 'pair.py'}:make", files / "binary.npz", tmp_path / "late.npz"
    run = tmp_path / "run"
    common = ["train", "--model-factory", pair, "--epochs", "1", "--quiet", "--out"]
    for data, test in [(late, good), (good, late)]:
        assert status([*common, run, "--data", data, "--test-data", test]) == 2
        line = one_line(capsys)
        assert "values 2 outside {0, 1}" in line and "site 'x'" in line, line
        assert line.endswith("(row 150)") and not run.exists(), line
    assert status([*common, run, "--data", good]) == 0
    capsys.readouterr()
    before = snapshot(run)
    assert status(["evaluate", run, "--data", late, "--particles", "2", "--quiet"]) == 2
    assert one_line(capsys).endswith("site 'x' of Pair (row 150)")
    assert snapshot(run) == before


def test_test_data_of_the_wrong_width_are_one_line_before_training(tmp_path, capsys, files):
    np.savez(tmp_path / "wide.npz", x=np.ones((8, 7), dtype=np.float32))
    out = tmp_path / "run"
    assert (
        status(
            [
                "train",
                "--model-factory",
                f"{files / 'pair.py'}:make",
                "--data",
                files / "binary.npz",
                "--test-data",
                tmp_path / "wide.npz",
                "--out",
                out,
                "--quiet",
            ]
        )
        == 2
    )
    line = one_line(capsys)
    assert line.startswith("pyro-vae train: error: the test data: ") and "8x7" in line, line
    assert not out.exists()


# --- files that are not what they claim ----------------------------------------------------


def _npz(kind: str, path: Path) -> None:
    if kind == "renamed .npy":
        np.save(path.with_suffix(".npy"), np.zeros((4, 5)))
        path.with_suffix(".npy").rename(path)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "datetime64":
        np.savez(path, x=np.array(["2020-01-01"], dtype="datetime64[D]"))
    elif kind == "object":
        np.savez(path, x=np.array([{}, 1], dtype=object))
    elif kind == "folder":
        path.mkdir()


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("renamed .npy", "it is a .npy file (one array)"),
        ("empty", "it is an empty file"),
        ("datetime64", "holds datetime64[D] values, not numbers"),
        ("object", "holds object values, not numbers"),
        ("folder", "is a folder, not a regular"),
    ],
)
def test_an_npz_that_is_not_an_archive_of_numbers_is_one_line(tmp_path, capsys, kind, expected):
    data = tmp_path / "data.npz"
    _npz(kind, data)
    out = tmp_path / "run"
    assert (
        status(
            [
                "train",
                "--model-factory",
                f"{USER_MODELS}:make_fa",
                "--data",
                data,
                "--out",
                out,
                "--quiet",
            ]
        )
        == 2
    )
    assert expected in one_line(capsys)
    assert not out.exists()


def test_an_npz_is_sized_by_its_members_declared_sizes_before_decompression(tmp_path, capsys):
    bomb = tmp_path / "bomb.npz"
    np.savez_compressed(bomb, x=np.zeros(32 * 2**20, dtype=np.uint8))
    assert bomb.stat().st_size < 2**20  # a small file holding 32 MiB of zeros
    out = tmp_path / "run"
    assert (
        status(
            [
                "train",
                "--model-factory",
                f"{USER_MODELS}:make_fa",
                "--data",
                bomb,
                "--out",
                out,
                "--quiet",
                "--max-memory",
                "16M",
            ]
        )
        == 2
    )
    line = one_line(capsys)
    assert "reading bomb.npz (32.0 MiB of arrays once decompressed)" in line, line
    assert not out.exists()


def test_a_pickled_pt_file_is_one_line_without_torchs_warnings(tmp_path):
    data = tmp_path / "data.pt"
    with open(data, "wb") as stream:
        pickle.dump({"x": np.zeros((4, 5))}, stream)
    out = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pyro_vae",
            "train",
            "--model-factory",
            f"{USER_MODELS}:make_fa",
            "--data",
            str(data),
            "--out",
            str(out),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "cannot read" in result.stderr, result.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    "name, change, expected",
    [
        ("config.json", "dev-zero", "is a device, not a regular file (a link to /dev/zero)"),
        ("config.json", "deep", "its JSON nests too deeply"),
        ("config.json", "huge", "more than the 64.0 MiB such a file may hold"),
        ("checkpoint.pt", "dev-zero", "is a device, not a regular file"),
    ],
)
def test_run_files_that_are_not_regular_bounded_files_are_one_line(
    run_dir, capsys, name, change, expected
):
    path = run_dir / name
    path.unlink()
    if change == "dev-zero":
        path.symlink_to("/dev/zero")
    elif change == "deep":
        path.write_text("[" * 100_000 + "]" * 100_000)
    else:
        with open(path, "wb") as stream:  # sparse: no disk used
            stream.truncate(65 * 2**20)
    before = snapshot(run_dir) if change != "dev-zero" else None
    assert status(["sample", run_dir, "--device", "cpu"]) == 2
    assert expected in one_line(capsys)
    assert not list(run_dir.glob("samples-*.png"))
    if before is not None:
        assert snapshot(run_dir) == before


# --- the PNG files that sample and transfer write ----------------------------------------


@pytest.mark.parametrize(
    "command, target, expected",
    [
        ("sample", "fifo.png", "is a FIFO, not a regular file"),
        ("sample", "folder.png", "is a folder, not a regular file"),
        ("sample", "RUN/checkpoint.pt", "is a file of the run in"),
        ("sample", "RUN/samples.png", "is a file of the run in"),
        ("sample", "notes.txt", "does not end in .png"),
        ("sample", "mine.png", "exists: give --force to replace it"),
        ("transfer", "notes.txt", "does not end in .png"),
        ("transfer", "fifo.png", "is a FIFO, not a regular file"),
    ],
)
def test_an_output_that_is_not_a_new_png_file_is_refused(
    run_dir, tmp_path, capsys, command, target, expected
):
    os.mkfifo(tmp_path / "fifo.png")
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "mine.png").write_bytes(b"mine")
    (tmp_path / "notes.txt").write_text("notes")
    output = run_dir / target[4:] if target.startswith("RUN/") else tmp_path / target
    before, files = snapshot(run_dir), snapshot(tmp_path)
    assert status([command, run_dir, "--num", "4", "--output", output]) == 2
    assert f"--output {output} {expected}" in one_line(capsys)
    assert snapshot(run_dir) == before and snapshot(tmp_path) == files
    assert stat.S_ISFIFO(os.lstat(tmp_path / "fifo.png").st_mode)


def test_force_replaces_a_file_and_says_so(run_dir, tmp_path, capsys):
    mine = tmp_path / "mine.png"
    mine.write_bytes(b"mine")
    assert status(["sample", run_dir, "--num", "4", "--device", "cpu", "--force"]) == 2
    assert "--force lets --output replace a file" in one_line(capsys)
    argv = ["sample", run_dir, "--num", "4", "--device", "cpu", "--output", mine, "--force"]
    assert status(argv) == 0
    assert capsys.readouterr().err == f"pyro-vae: {mine} existed: replaced it (--force)\n"
    assert mine.read_bytes().startswith(b"\x89PNG")


# --- options that would do nothing, caps that are said -----------------------------------


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["evaluate", "RUN", "--ais-steps", "5"], "--ais-steps need(s) --ais"),
        (["evaluate", "RUN", "--chains", "5"], "--chains need(s) --ais"),
        (["evaluate", "RUN", "--ais-start", "prior"], "--ais-start need(s) --ais"),
        (["evaluate", "RUN", "--ais", "--particles", "5"], "--particles appl(ies) to importance"),
        (["evaluate", "RUN", "--ais", "--particle-chunk", "5"], "--particle-chunk appl(ies)"),
        (
            ["train", "--download", *TINY, "--out", "RUN/new"],
            "--download locate(s) the MNIST files; the digits images ship with the package",
        ),
        (
            ["train", "--data-dir", "RUN", *TINY, "--out", "RUN/new"],
            "--data-dir locate(s) the MNIST",
        ),
        (
            ["train", "--resume", "RUN", "--epochs", "2", "--data-dir", "RUN"],
            "--data-dir locate(s)",
        ),
        (["classify", "RUN", "--data", "RUN/x.npz"], "unrecognized arguments: --data"),
        (["sample", "RUN", "--nu", "4"], "unrecognized arguments: --nu 4"),
        (["classify", "RUN", "--data-dir", "RUN"], "--data-dir locates the MNIST files; the run"),
        (["evaluate", "RUN", "--data-dir", "RUN"], "is of the digits images, which ship with"),
        (["evaluate", "RUN", "--data", "RUN/x.npz", "--split", "test"], "--split picks a split"),
        (["evaluate", "RUN", "--dist-timeout", "5"], "this process is the only one"),
        (["train", "--dist-timeout", "5", *TINY, "--out", "RUN/new"], "--dist-timeout is how"),
        (
            ["train", "--patience", "1", *TINY, "--out", "RUN/new"],
            "--patience 1 can never stop a run of 1 epoch(s) early",
        ),
        (
            ["bdmc", "RUN", "--num", "400", "--ais-steps", "2", "--chains", "2", "--device", "cpu"],
            "--num 400 is more than the 300 test images whose shape the simulated data take: "
            "give --num 300 or fewer",
        ),
    ],
)
def test_options_that_do_nothing_in_the_command_are_refused(
    run_dir, capsys, monkeypatch, argv, expected
):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    before = snapshot(run_dir)
    assert (
        status([str(run_dir) if a == "RUN" else a.replace("RUN", str(run_dir)) for a in argv]) == 2
    )
    assert expected in one_line(capsys)
    assert snapshot(run_dir) == before and not (run_dir / "new").exists()


def test_data_dir_is_taken_for_a_run_of_the_mnist_files(run_dir):
    config = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**config, "dataset": "mnist"}))
    check_data_dir(argparse.Namespace(run_dir=run_dir, data_dir=str(run_dir)))


# --- sizes the machine cannot hold ---------------------------------------------------------


@pytest.mark.parametrize(
    "argv, expected",
    [
        (
            ["bdmc", "RUN", "--ais-steps", HUGE, "--chains", "1", "--max-memory", "1G"],
            "AIS of 1,000,000,000 steps with 1 chains",
        ),
        (
            ["evaluate", "RUN", "--ais", "--ais-steps", HUGE, "--max-memory", "1G"],
            "AIS of 1,000,000,000 steps with 16 chains",
        ),
        (
            ["sample", "RUN", "--num", "200000", "--max-memory", "4G"],
            "drawing 200,000 samples and their grid",
        ),
    ],
)
def test_steps_and_grids_the_memory_cannot_hold_are_refused_before_allocation(
    run_dir, capsys, argv, expected
):
    before = snapshot(run_dir)
    assert status([str(run_dir) if a == "RUN" else a for a in argv]) == 2
    line = one_line(capsys)
    assert expected in line and "more than the memory limit" in line, line
    assert snapshot(run_dir) == before


def test_a_grid_wider_than_a_figure_can_be_is_refused(run_dir, capsys):
    assert status(["sample", run_dir, "--num", "10000000"]) == 2
    assert "more than the 65,535 a side may have" in one_line(capsys)
    assert not list(run_dir.glob("samples-*.png"))


def test_a_users_pair_is_sized_from_one_particle_on_its_first_batch(tmp_path, capsys, files):
    out = tmp_path / "run"
    assert (
        status(
            [
                "train",
                "--model-factory",
                f"{files / 'pair.py'}:make",
                "--data",
                files / "binary.npz",
                "--out",
                out,
                "--quiet",
                "--particles",
                HUGE,
                "--max-memory",
                "1G",
            ]
        )
        == 2
    )
    line = one_line(capsys)
    assert "training 1,000,000,000 particle(s) per step on batches of 64" in line, line
    assert "per particle, measured on the first batch" in line
    assert not out.exists()


# --- work that would take too long ---------------------------------------------------------


@pytest.mark.parametrize(
    "argv, what",
    [
        (
            ["evaluate", "RUN", "--particles", "1000000", "--particle-chunk", "10", "--quiet"],
            "evaluating 1,000,000 particles on 300 datapoints would take about 3.47 days "
            "(300,000 pieces of about 1 s)",
        ),
        (
            [
                "evaluate",
                "RUN",
                "--ais",
                "--ais-steps",
                "100000",
                "--chains",
                "1",
                "--limit",
                "4",
                "--quiet",
            ],
            "AIS of 100,000 steps with 1 chains would take about 1.16 days",
        ),
        (
            ["bdmc", "RUN", "--ais-steps", "100000", "--chains", "1", "--num", "2"],
            "BDMC of 100,000 steps each way with 1 chains would take about 2.31 days",
        ),
    ],
)
def test_work_estimated_to_exceed_the_time_bound_is_refused_with_the_estimate(
    run_dir, capsys, ticking_clock, argv, what
):
    before = snapshot(run_dir)
    assert status([str(run_dir) if a == "RUN" else a for a in argv]) == 2
    line = one_line(capsys)
    assert what in line and "more than the 1 h allowed: to go ahead, give --max-seconds" in line
    assert snapshot(run_dir) == before


def test_the_time_bound_is_the_max_seconds_option(run_dir, capsys, ticking_clock):
    argv = ["evaluate", run_dir, "--particles", "20", "--particle-chunk", "10", "--quiet"]
    assert status([*argv, "--max-seconds", "2"]) == 2  # 3 batches of 2 chunks: about 6 s
    assert (
        "would take about 6 s (6 pieces of about 1 s), more than the 2 s allowed: to go "
        "ahead, give --max-seconds 8," in one_line(capsys)
    )
    assert status(argv) == 0


def test_a_training_estimated_to_exceed_its_time_bound_is_refused_before_it_writes(
    tmp_path, capsys, ticking_clock
):
    out = tmp_path / "run"
    argv = ["train", *TINY, "--epochs", "50", "--out", str(out)]
    assert status([*argv, "--max-seconds", "60"]) == 2  # 50 epochs of 3 steps of 1 s
    assert (
        "error: training 50 epoch(s) of 3 step(s) would take about 2.5 min (150 steps of "
        "about 1 s), more than the 1 min allowed: to go ahead, give --max-seconds 188"
        in one_line(capsys)
    )
    assert not out.exists()
    assert status([*argv[:-4], "--epochs", "4", "--out", str(out)]) == 0  # no bound: trains


def test_the_steps_of_fit_are_the_pieces_of_one_request(monkeypatch):
    from user_models import fa_data, make_fa

    import pyro_vae

    data = torch.as_tensor(fa_data(40))
    readings = itertools.count()
    monkeypatch.setattr(budget, "clock", lambda: float(next(readings)))
    with budget.time_limit(5.0), pytest.raises(budget.TimeLimitError, match="training 3 "):
        pyro_vae.fit(make_fa(), data, epochs=3, batch_size=20)  # 6 steps of 1 s
    with budget.time_limit(6.0):  # 1 + 1 × 5 s: not more than the bound
        assert len(pyro_vae.fit(make_fa(), data, epochs=3, batch_size=20).history.epoch) == 3


def test_a_budget_times_the_first_piece_apart_and_refuses_only_under_a_limit(monkeypatch):
    readings = iter([0.0, 10.0, 11.0, 12.0])  # a first piece of 10 s, then 1 s each
    monkeypatch.setattr(budget, "clock", lambda: next(readings))
    with budget.time_limit(100.0), budget.work(200, "the work"):
        budget.piece_done()
        with pytest.raises(
            budget.TimeLimitError,
            match=r"about 3\.48 min \(200 pieces of "
            r"about 1 s\)",
        ):
            budget.piece_done()  # 10 + 1 × 199 = 209 s
    with budget.work(10**9, "unbounded"):  # no limit: nothing is timed
        budget.piece_done()


# --- plots ---------------------------------------------------------------------------------


def test_the_reconstruction_rows_are_named_and_the_latent_plot_has_a_legend():
    from pyro_vae.runs.plots import plot_latent, plot_reconstructions

    originals = torch.rand(4, 4)
    inputs = (originals > 0.5).float()
    figure = plot_reconstructions(originals, torch.rand(4, 4), (2, 2), inputs)
    ax = figure.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == [
        "test images",
        "binarized inputs",
        "reconstructions",
    ]
    shown = ax.get_images()[0].get_array()
    assert np.allclose(shown[:2, :2], originals[0].reshape(2, 2).numpy())  # top: the originals
    figure = plot_reconstructions(originals, torch.rand(4, 4), (2, 2), originals)
    assert len(figure.axes[0].get_yticklabels()) == 2  # inputs equal to the originals: no row

    labels = torch.arange(10).repeat(3)
    figure = plot_latent(torch.randn(30, 2), labels)
    assert len(figure.axes) == 1  # no colour bar
    legend = figure.axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == [str(i) for i in range(10)]


def test_data_given_to_evaluate_are_checked_against_the_likelihood(tmp_path, capsys, files):
    run = tmp_path / "run"
    assert (
        status(
            [
                "train",
                "--model-factory",
                f"{files / 'pair.py'}:make",
                "--data",
                files / "binary.npz",
                "--out",
                run,
                "--quiet",
                "--epochs",
                "1",
            ]
        )
        == 0
    )
    capsys.readouterr()
    x = np.zeros((8, 5), dtype=np.float32)
    x[3, 2] = 0.5
    np.savez(tmp_path / "grey.npz", x=x)
    before = snapshot(run)
    for extra in ([], ["--ais", "--ais-steps", "2"]):
        assert status(["evaluate", run, "--data", tmp_path / "grey.npz", "--quiet", *extra]) == 2
        assert "values 0.5 outside {0, 1}" in one_line(capsys)
    assert snapshot(run) == before


@pytest.fixture(scope="module")
def cvae_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cvae") / "run"
    assert main(["train", "--model", "cvae", *TINY, "--out", str(out)]) == 0
    return out


def test_classify_refuses_particles_that_would_take_too_long(cvae_run, capsys, ticking_clock):
    before = snapshot(cvae_run)
    assert status(["classify", cvae_run, "--particles", HUGE, "--limit", "10"]) == 2
    line = one_line(capsys)
    assert "evaluating 1,000,000,000 particles on 100 datapoints would take about" in line
    assert "give --max-seconds" in line
    assert snapshot(cvae_run) == before


def test_classify_refuses_batches_the_memory_cannot_hold(cvae_run, capsys):
    before = snapshot(cvae_run)
    assert (
        status(
            [
                "classify",
                cvae_run,
                "--particles",
                "1000",
                "--batch-size",
                "1000000",
                "--max-memory",
                "10M",
            ]
        )
        == 2
    )
    line = one_line(capsys)
    assert (
        "classifying with 1,000 particles in chunks of 500 on batches of 3,000 image-label "
        "pairs needs about"
    ) in line and "more than the memory limit" in line, line
    assert snapshot(cvae_run) == before


def test_mnist_files_that_are_not_regular_files_are_one_line(tmp_path, capsys):
    from pyro_vae.data.images import MNIST_FILES

    folder = tmp_path / "mnist"
    folder.mkdir()
    for filename, _ in MNIST_FILES.values():
        (folder / filename).symlink_to("/dev/zero")
    out = tmp_path / "run"
    assert status(["train", "--dataset", "mnist", "--data-dir", folder, *TINY, "--out", out]) == 2
    assert "is a device, not a regular file (a link to /dev/zero)" in one_line(capsys)
    assert not out.exists()


def test_one_particle_of_a_users_pair_is_measured_by_the_activations_it_saves(files):
    import importlib.util

    from pyro_vae.core.protocol import pair_activation_bytes

    spec = importlib.util.spec_from_file_location("pair_for_sizes", files / "pair.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    pair = module.Pair()
    pair.enc = torch.nn.Sequential(
        torch.nn.Linear(5, 1000), torch.nn.Softplus(), torch.nn.Linear(1000, 4)
    )
    small, large = (pair_activation_bytes(pair, torch.ones(rows, 5)) for rows in (64, 128))
    assert small >= 64 * 1000 * 4  # at least the hidden layer's activations
    assert 1.9 < large / small < 2.1  # activations grow with the rows; the parameters do not
    assert all(p.grad is None for p in pair.parameters())
