"""Smoke test of the MNIST table's code paths (its CPU table, its budget and its budget's rows)
on a small fake MNIST (nothing is trained for real here; the table's numbers come from
benchmarks/mnist_table.py runs)."""

import json
import sys

import numpy as np
import pytest
import torch
from benchmark_loader import BENCHMARKS, load_benchmark

from pyro_vae.data.images import Dataset, Split, load_binarized_mnist
from pyro_vae.util.errors import DataError

SCRIPT = BENCHMARKS / "mnist_table.py"


@pytest.fixture
def table(monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script puts benchmarks/ on it
    return load_benchmark("mnist_table", monkeypatch)


def fake_mnist(data_dir=None):
    """64 training and 20 test images of random intensities, in place of MNIST's files."""
    g = torch.Generator().manual_seed(0)
    return Dataset(
        "mnist",
        Split(torch.rand(64, 784, generator=g), torch.zeros(64).long()),
        Split(torch.rand(20, 784, generator=g), torch.zeros(20).long()),
        (28, 28),
        10,
    )


#: a budget's options for a run of a few steps on the CPU
TINY_BUDGET = [
    "--device",
    "cpu",
    "--eval-particles",
    "4",
    "--eval-particle-chunk",
    "4",
    "--probe-images",
    "5",
    "--probe-particles",
    "3",
]


@pytest.fixture
def fake_dir(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        split: (rng.random((n, 784)) < 0.15).astype(np.uint8)
        for split, n in (("train", 120), ("valid", 30), ("test", 20))
    }
    np.savez_compressed(tmp_path / "binarized_mnist.npz", **arrays)
    return tmp_path


def tiny_fixed(data_dir):
    """A fixed-protocol row of one epoch on the first 100 images of the fake data."""
    return [
        *("--protocol", "fixed", "--data-dir", str(data_dir), "--epochs", "1"),
        *("--limit", "100", "--batch-size", "50", "--eval-particles", "5"),
        *("--probe-images", "10", "--probe-every", "1"),
    ]


def test_the_loader_checks_the_published_file(fake_dir):
    with pytest.raises(DataError, match="not the published binarized MNIST"):
        load_binarized_mnist(fake_dir)
    data = load_binarized_mnist(fake_dir, verify=False)
    assert data.train.shape == (120, 784) and data.train.dtype == torch.float32
    assert set(data.test.unique().tolist()) <= {0.0, 1.0}


def test_fixed_protocol_rows_and_their_paired_difference(table, fake_dir, tmp_path, capsys):
    out = tmp_path / "table.json"
    common = [
        *tiny_fixed(fake_dir),
        "--quiet",
        "--out",
        str(out),
    ]
    assert table.main([*common, "--row", "vae", "--per-image", str(tmp_path / "vae.pt")]) == 0
    assert (
        table.main(
            [*common, "--row", "iwae", "--k", "3", "--per-image", str(tmp_path / "iwae3.pt")]
        )
        == 0
    )
    rows = json.loads(out.read_text())["rows"]
    assert [(r["estimator"], r["k"], r["protocol"]) for r in rows] == [
        ("meanfield", 1, "fixed"),
        ("iwae", 3, "fixed"),
    ]
    assert rows[0]["test_images"] == 20 and rows[0]["curve"][0]["epoch"] == 1
    capsys.readouterr()
    assert table.main(["--pairs", str(tmp_path / "vae.pt"), str(tmp_path / "iwae3.pt")]) == 0
    line = capsys.readouterr().out.strip()
    a, b = (torch.load(tmp_path / f"{n}.pt")["log_px"] for n in ("vae", "iwae3"))
    assert line.startswith(f"vae − iwae3: {(a - b).mean().item():+.3f} ± ")
    assert table.main(["--out", str(out), "--plot", str(tmp_path / "curves.png")]) == 0
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_row_all_trains_the_whole_table_and_pairs_every_two_rows(table, fake_dir, tmp_path, capsys):
    out, folder = tmp_path / "table.json", tmp_path / "scores"
    common = [
        *tiny_fixed(fake_dir),
        "--pseudo-inputs",
        "5",
        "--quiet",
        "--out",
        str(out),
    ]
    assert table.main([*common, "--row", "all", "--per-image-dir", str(folder)]) == 0
    written = json.loads(out.read_text())
    assert [
        (r["estimator"], r["k"], r["model"].endswith("pseudo-inputs")) for r in written["rows"]
    ] == [("meanfield", 1, False), ("iwae", 50, False), ("meanfield", 1, True)]
    names = ["fixed_vae", "fixed_iwae50", "fixed_vamp"]
    scores = {name: torch.load(folder / f"{name}.pt")["log_px"] for name in names}
    assert [(p["a"], p["b"]) for p in written["pairs"]] == [
        ("fixed_vae", "fixed_iwae50"),
        ("fixed_vae", "fixed_vamp"),
        ("fixed_iwae50", "fixed_vamp"),
    ]
    for pair in written["pairs"]:
        diff = scores[pair["a"]] - scores[pair["b"]]
        assert abs(pair["mean"] - diff.mean().item()) < 1e-9
        assert abs(pair["stderr"] - diff.std().item() / 20**0.5) < 1e-9
        assert (pair["protocol"], pair["epochs"], pair["images"]) == ("fixed", 1, 20)
    printed = capsys.readouterr().out
    assert printed.count("test log p̂") == 3 and "fixed_vae − fixed_iwae50: " in printed
    # a second table keeps the rows and pairs already recorded
    assert (
        table.main([*common, "--row", "all", "--layers", "2", "--per-image-dir", str(folder)]) == 0
    )
    written = json.loads(out.read_text())
    assert len(written["rows"]) == 5 and len(written["pairs"]) == 4
    assert (written["pairs"][-1]["a"], written["pairs"][-1]["b"]) == (
        "fixed_vae_2l",
        "fixed_iwae50_2l",
    )
    assert table.main([*common, "--row", "all", "--k", "5"]) == 2
    assert "drop --k" in capsys.readouterr().err


def test_row_families_trains_iwae_and_the_estimator_families_and_pairs_them(
    table, fake_dir, tmp_path, capsys
):
    out, folder = tmp_path / "table.json", tmp_path / "scores"
    common = [*tiny_fixed(fake_dir), "--quiet", "--out", str(out)]
    assert table.main([*common, "--row", "families", "--per-image-dir", str(folder)]) == 0
    written = json.loads(out.read_text())
    assert [
        (r["estimator"], r["particles"], r["k"], r["elbo_options"]) for r in written["rows"]
    ] == [
        ("iwae", 1, 50, {}),
        ("renyi", 1, 50, {"alpha": 0.5}),
        ("miwae", 5, 10, {}),
        ("piwae", 5, 10, {}),
        ("ciwae", 1, 50, {"elbo_weight": 0.5}),
        ("rws", 1, 50, {}),
    ]
    names = ["fixed_iwae50", "fixed_renyi50", "fixed_miwae5x10", "fixed_piwae5x10"]
    names += ["fixed_ciwae50", "fixed_rws50"]
    assert [p["a"] for p in written["pairs"][:5]] == ["fixed_iwae50"] * 5
    assert [p["b"] for p in written["pairs"][:5]] == names[1:]
    assert len(written["pairs"]) == 15
    for pair in written["pairs"]:
        a, b = (torch.load(folder / f"{pair[n]}.pt")["log_px"] for n in ("a", "b"))
        assert abs(pair["mean"] - (a - b).mean().item()) < 1e-9
    assert "fixed_iwae50 − fixed_rws50: " in capsys.readouterr().out
    # the families are the table's rows: the wall-clock budget trains only its own
    assert table.main(["--row", "rws", "--out-dir", str(tmp_path / "b")]) == 2
    assert "the budget trains the vae, iwae and dreg rows" in capsys.readouterr().err


def test_the_vampprior_row_on_the_fixed_protocol(table, fake_dir, tmp_path):
    out = tmp_path / "table.json"
    assert (
        table.main(
            [
                *tiny_fixed(fake_dir),
                "--quiet",
                "--out",
                str(out),
                "--row",
                "vamp",
                "--pseudo-inputs",
                "7",
            ]
        )
        == 0
    )
    row = json.loads(out.read_text())["rows"][0]
    assert row["model"].endswith("VampPrior with 7 pseudo-inputs")
    assert row["estimator"] == "meanfield" and row["k"] == 1 and row["published"] == -85.79
    assert table.main(["--row", "vamp", "--layers", "2", "--epochs", "1", "--out", str(out)]) == 2


#: the settings a budget run records in its budget.json
BUDGET_CONFIG_KEYS = (
    "data_dir estimator importance_samples minutes batch_size lr lr_final "
    "train_matmul_precision device threads seed eval_particles eval_batch_size "
    "eval_particle_chunk probe_seconds probe_images probe_particles limit out_dir"
).split()


def test_the_budget_rows_run_every_one_layer_row_and_pair_them(
    table, tmp_path, monkeypatch, capsys
):
    """The budget's code path (meant for a GPU), on a CPU with a tiny fake MNIST."""
    monkeypatch.setattr(table, "load_mnist", fake_mnist)
    out = tmp_path / "rows"
    argv = ["--data-dir", str(tmp_path), *TINY_BUDGET, "--minutes", "0.002"]
    assert table.main([*argv, "--rows", "vae", "iwae5", "--out-dir", str(out)]) == 0
    written = json.loads((out / "rows.json").read_text())
    assert [(r["row"], r["estimator"], r["k"]) for r in written["rows"]] == [
        ("vae", "meanfield", 1),
        ("iwae5", "iwae", 5),
    ]
    assert [r["published"] for r in written["rows"]] == [-86.76, -85.54]
    (pair,) = written["pairs"]
    a, b = (torch.load(out / name / "per_image.pt")["log_px"] for name in ("vae", "iwae5"))
    assert (pair["a"], pair["b"]) == ("vae", "iwae5")
    assert abs(pair["mean"] - (a - b).mean().item()) < 1e-9 and len(a) == 20
    report = json.loads((out / "iwae5" / "budget.json").read_text())
    assert list(report["config"]) == BUDGET_CONFIG_KEYS
    assert (report["config"]["estimator"], report["config"]["batch_size"], report["k"]) == (
        "iwae",
        256,
        5,
    )
    assert report["partial"] is False and report["full_protocol"] is False
    assert report["target"] == -84.5 and report["passed"] == (report["log_px"]["mean"] >= -84.5)
    assert report["training"]["curve"]["probe_log_px"]  # a probe at the end of the budget
    assert (out / "vae" / "budget.png").read_bytes()[:4] == b"\x89PNG"
    # one budget row on its own: --limit keeps the first training and test images
    single = tmp_path / "single"
    assert table.main([*argv, "--row", "dreg", "--limit", "10", "--out-dir", str(single)]) == 0
    report = json.loads((single / "budget.json").read_text())
    assert (report["config"]["estimator"], report["config"]["limit"], report["k"]) == (
        "dreg",
        10,
        50,
    )
    assert torch.load(single / "per_image.pt")["log_px"].shape == (10,)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--out-dir", "OUT", "--probe-every", "2"], "--probe-every is an option of the table"),
        (["--epochs", "1", "--probe-seconds", "2"], "--probe-seconds is an option of the budget"),
        pytest.param(
            ["--epochs", "1", "--device", "cuda"],
            "--device cuda: no CUDA GPU is available here",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here"),
        ),
        (["--out-dir", "OUT", "--row", "all", "--k", "5"], "drop --k"),
        (["--out-dir", "OUT", "--row", "vae", "--parallel"], "--parallel trains the rows"),
        (["--row", "vae"], "give --minutes or --epochs"),
        (["--out-dir", "OUT", "--plot", "curves.png"], "drop --out-dir"),
    ],
)
def test_an_option_of_the_other_mode_is_refused_in_one_line(table, tmp_path, capsys, argv, message):
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    assert table.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("mnist_table: ") and message in err and err.count("\n") == 1
    assert not list(tmp_path.iterdir())


WRAPPER = """
import time
start = time.time()
import importlib.util, sys
import torch
from pyro_vae.data.images import Dataset, Split
spec = importlib.util.spec_from_file_location("mnist_table", {script!r})
table = importlib.util.module_from_spec(spec)
sys.modules["mnist_table"] = table
spec.loader.exec_module(table)
g = torch.Generator().manual_seed(0)
table.load_mnist = lambda data_dir: Dataset(
    "mnist", Split(torch.rand(64, 784, generator=g), torch.zeros(64).long()),
    Split(torch.rand(20, 784, generator=g), torch.zeros(20).long()), (28, 28), 10)
args = sys.argv[1:]
if {fail!r} in args:
    print("mnist_table: this row is refused", file=sys.stderr)
    sys.exit(2)
status = table.main(args)
print("ran", start, time.time())
sys.exit(status)
"""


def _parallel_rows(table, tmp_path, monkeypatch, fail):
    """The script whose rows run in processes that read a fake MNIST (and refuse a row whose
    command line holds ``fail``)."""
    wrapper = tmp_path / "budget_on_fake_mnist.py"
    wrapper.write_text(WRAPPER.format(script=str(SCRIPT), fail=fail))
    monkeypatch.setattr(table, "ROW_COMMAND", [sys.executable, str(wrapper)])
    return table


@pytest.mark.parametrize("fail", ["no row", "iwae"])
def test_the_budget_rows_train_at_once_in_parallel(table, tmp_path, monkeypatch, capsys, fail):
    rows = _parallel_rows(table, tmp_path, monkeypatch, fail)
    out = tmp_path / "rows"
    status = rows.main(
        [
            "--data-dir",
            str(tmp_path),
            *TINY_BUDGET,
            "--threads",
            "1",
            "--minutes",
            "0.01",
            "--rows",
            "vae",
            "iwae5",
            "dreg50",
            "--parallel",
            "--out-dir",
            str(out),
        ]
    )
    written = json.loads((out / "rows.json").read_text())
    names = ["vae", "dreg50"] if fail == "iwae" else ["vae", "iwae5", "dreg50"]
    assert [r["row"] for r in written["rows"]] == names
    assert len(written["pairs"]) == len(names) * (len(names) - 1) // 2
    spans = [
        [float(t) for t in (out / name / "log.txt").read_text().split("ran")[-1].split()]
        for name in names
    ]
    assert max(start for start, _ in spans) < min(end for _, end in spans)  # all at once
    if fail == "iwae":
        assert status == 2
        assert capsys.readouterr().err.strip() == (
            "mnist_table: the iwae5 row failed (mnist_table: this row is refused)"
        )
    else:
        assert status == 0


def test_the_parallel_rows_refuse_bad_input_in_one_line_and_write_nothing(
    table, tmp_path, monkeypatch, capsys
):
    rows = _parallel_rows(table, tmp_path, monkeypatch, "--out-dir")
    out = tmp_path / "rows"
    assert (
        rows.main(
            [
                "--data-dir",
                str(tmp_path),
                "--rows",
                "vae",
                "iwae5",
                "--parallel",
                "--out-dir",
                str(out),
            ]
        )
        == 2
    )
    assert capsys.readouterr().err == (
        "mnist_table: every row failed (mnist_table: this row is refused)\n"
    )
    assert not out.exists()
