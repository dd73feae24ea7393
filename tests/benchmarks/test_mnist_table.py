"""Smoke test of the MNIST table's code paths on a small fake fixed-binarized MNIST (nothing
is trained for real here; the table's numbers come from benchmarks/mnist_table.py runs)."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_vae.data.images import load_binarized_mnist
from pyro_vae.util.errors import DataError

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "mnist_table.py"


def _script():
    spec = importlib.util.spec_from_file_location("mnist_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def fake_dir(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        split: (rng.random((n, 784)) < 0.15).astype(np.uint8)
        for split, n in (("train", 120), ("valid", 30), ("test", 20))
    }
    np.savez_compressed(tmp_path / "binarized_mnist.npz", **arrays)
    return tmp_path


def test_the_loader_checks_the_published_file(fake_dir):
    with pytest.raises(DataError, match="not the published binarized MNIST"):
        load_binarized_mnist(fake_dir)
    data = load_binarized_mnist(fake_dir, verify=False)
    assert data.train.shape == (120, 784) and data.train.dtype == torch.float32
    assert set(data.test.unique().tolist()) <= {0.0, 1.0}


def test_fixed_protocol_rows_and_their_paired_difference(fake_dir, tmp_path, capsys):
    table = _script()
    out = tmp_path / "table.json"
    common = [
        "--protocol",
        "fixed",
        "--data-dir",
        str(fake_dir),
        "--epochs",
        "1",
        "--limit",
        "100",
        "--batch-size",
        "50",
        "--eval-particles",
        "5",
        "--probe-images",
        "10",
        "--probe-every",
        "1",
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


def test_row_all_trains_the_whole_table_and_pairs_every_two_rows(fake_dir, tmp_path, capsys):
    table = _script()
    out, folder = tmp_path / "table.json", tmp_path / "scores"
    common = [
        "--protocol",
        "fixed",
        "--data-dir",
        str(fake_dir),
        "--epochs",
        "1",
        "--limit",
        "100",
        "--batch-size",
        "50",
        "--eval-particles",
        "5",
        "--probe-images",
        "10",
        "--probe-every",
        "1",
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


def test_the_vampprior_row_on_the_fixed_protocol(fake_dir, tmp_path):
    table = _script()
    out = tmp_path / "table.json"
    assert (
        table.main(
            [
                "--protocol",
                "fixed",
                "--data-dir",
                str(fake_dir),
                "--epochs",
                "1",
                "--limit",
                "100",
                "--batch-size",
                "50",
                "--eval-particles",
                "5",
                "--probe-images",
                "10",
                "--probe-every",
                "1",
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


def test_the_gpu_rows_driver_runs_every_one_layer_row_and_pairs_them(tmp_path, monkeypatch, capsys):
    """The GPU script's code path, on a CPU with a tiny fake MNIST (the loader is replaced)."""
    from pyro_vae.data.images import Dataset, Split

    g = torch.Generator().manual_seed(0)
    fake = Dataset(
        "mnist",
        Split(torch.rand(64, 784, generator=g), torch.zeros(64).long()),
        Split(torch.rand(20, 784, generator=g), torch.zeros(20).long()),
        (28, 28),
        10,
    )
    spec = importlib.util.spec_from_file_location(
        "mnist_gpu_rows", SCRIPT.parent / "mnist_gpu_rows.py"
    )
    rows = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rows)
    real = rows._sibling

    def sibling(name):
        module = real(name)
        if name == "mnist_gpu_budget":
            monkeypatch.setattr(module, "load_mnist", lambda data_dir: fake)
        return module

    monkeypatch.setattr(rows, "_sibling", sibling)
    out = tmp_path / "rows"
    assert (
        rows.main(
            [
                "--data-dir",
                str(tmp_path),
                "--device",
                "cpu",
                "--minutes",
                "0.002",
                "--eval-particles",
                "4",
                "--eval-particle-chunk",
                "4",
                "--probe-images",
                "5",
                "--probe-particles",
                "3",
                "--rows",
                "vae",
                "iwae5",
                "--out-dir",
                str(out),
            ]
        )
        == 0
    )
    written = json.loads((out / "rows.json").read_text())
    assert [(r["row"], r["estimator"], r["k"]) for r in written["rows"]] == [
        ("vae", "meanfield", 1),
        ("iwae5", "iwae", 5),
    ]
    (pair,) = written["pairs"]
    a, b = (torch.load(out / name / "per_image.pt")["log_px"] for name in ("vae", "iwae5"))
    assert (pair["a"], pair["b"]) == ("vae", "iwae5")
    assert abs(pair["mean"] - (a - b).mean().item()) < 1e-9 and len(a) == 20


WRAPPER = """
import time
start = time.time()
import importlib.util, sys
import torch
from pyro_vae.data.images import Dataset, Split
spec = importlib.util.spec_from_file_location("mnist_gpu_budget", {script!r})
budget = importlib.util.module_from_spec(spec)
sys.modules["mnist_gpu_budget"] = budget
spec.loader.exec_module(budget)
g = torch.Generator().manual_seed(0)
budget.load_mnist = lambda data_dir: Dataset(
    "mnist", Split(torch.rand(64, 784, generator=g), torch.zeros(64).long()),
    Split(torch.rand(20, 784, generator=g), torch.zeros(20).long()), (28, 28), 10)
args = sys.argv[1:]
if {fail!r} in args:
    print("mnist_gpu_budget: error: this row is refused", file=sys.stderr)
    sys.exit(2)
status = budget.main(args)
print("ran", start, time.time())
sys.exit(status)
"""


def _parallel_rows(tmp_path, monkeypatch, fail):
    spec = importlib.util.spec_from_file_location(
        "mnist_gpu_rows", SCRIPT.parent / "mnist_gpu_rows.py"
    )
    rows = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rows)
    wrapper = tmp_path / "budget_on_fake_mnist.py"
    wrapper.write_text(WRAPPER.format(script=str(SCRIPT.parent / "mnist_gpu_budget.py"), fail=fail))
    monkeypatch.setattr(rows, "BUDGET_SCRIPT", wrapper)
    return rows


@pytest.mark.parametrize("fail", ["no row", "iwae"])
def test_the_gpu_rows_driver_trains_rows_at_once_in_parallel(tmp_path, monkeypatch, capsys, fail):
    rows = _parallel_rows(tmp_path, monkeypatch, fail)
    out = tmp_path / "rows"
    status = rows.main(
        [
            "--data-dir",
            str(tmp_path),
            "--device",
            "cpu",
            "--threads",
            "1",
            "--minutes",
            "0.01",
            "--eval-particles",
            "4",
            "--eval-particle-chunk",
            "4",
            "--probe-images",
            "5",
            "--probe-particles",
            "3",
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
            "mnist_gpu_rows: the iwae5 row failed (mnist_gpu_budget: error: this row is refused)"
        )
    else:
        assert status == 0


def test_the_parallel_driver_refuses_bad_input_in_one_line_and_writes_nothing(
    tmp_path, monkeypatch, capsys
):
    rows = _parallel_rows(tmp_path, monkeypatch, "--out-dir")
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
        "mnist_gpu_rows: every row failed (mnist_gpu_budget: error: this row is refused)\n"
    )
    assert not out.exists()
