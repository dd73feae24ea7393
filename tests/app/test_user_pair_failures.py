"""A user's pair or data that fail where the package runs them itself (the memory probe, the
data checks) end the command in one line with status 2, and leave the run folder as it was."""

from pathlib import Path

import numpy as np
import pytest

from pyro_vae.app.cli import main

PAIR = """
import pyro, pyro.distributions as dist, torch
from torch import nn

PRIOR = 2


class Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.dec, self.enc = nn.Linear(2, 5), nn.Linear(5, 4)

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], PRIOR), 1.).to_event(1))
            pyro.sample("x", dist.Normal(self.dec(z[..., :2]), 1.).to_event(1), obs=x)

    def guide(self, x):
        h = self.enc(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(h[:, :2], h[:, 2:].exp()).to_event(1))


def make():
    return Pair()
"""


def run(argv, capsys) -> tuple[int, str]:
    """The command's status and its standard error, which must be one line without a
    traceback."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) <= 1 and "Traceback" not in err, err
    return code, err


def contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture
def user(tmp_path):
    """A folder with the user's pair (pair.py) and 64 rows of data for it (x.npz)."""
    (tmp_path / "pair.py").write_text(PAIR)
    np.savez(tmp_path / "x.npz", x=np.random.default_rng(0).normal(size=(64, 5)))
    return tmp_path


def train_argv(user: Path, *extra, data="x.npz") -> list:
    return ["train", "--model-factory", f"{user / 'pair.py'}:make", "--data", user / data,
            "--batch-size", "32", "--quiet", *extra]  # fmt: skip


MISMATCH = "the latent 'z' of Pair has shape [32, 2] in the guide but the model's distribution"


def test_a_latent_whose_shapes_disagree_is_one_line_in_train(user, capsys):
    (user / "pair.py").write_text(PAIR.replace("PRIOR = 2", "PRIOR = 3"))
    code, err = run(train_argv(user, "--out", user / "run"), capsys)
    assert (code, MISMATCH in err, "shape [32, 3]" in err) == (2, True, True), err
    assert not (user / "run").exists()


def test_a_pair_edited_after_training_is_one_line_in_evaluate_ais_and_resume(user, capsys):
    out, data = user / "run", user / "x.npz"
    assert run(train_argv(user, "--out", out, "--epochs", "1"), capsys)[0] == 0
    (user / "pair.py").write_text(PAIR.replace("PRIOR = 2", "PRIOR = 3"))
    before = contents(out)
    for argv in (
        ["evaluate", out, "--data", data, "--batch-size", "32", "--quiet"],  # the memory probe
        ["evaluate", out, "--data", data, "--ais", "--ais-steps", "2", "--batch-size", "32"],
        ["train", "--resume", out, "--epochs", "2", "--quiet"],
    ):
        code, err = run(argv, capsys)
        assert (code, MISMATCH in err) == (2, True), (argv, err)
    assert contents(out) == before


@pytest.mark.parametrize("length", ["-1", "2.5"])
def test_a_dataset_whose_length_is_not_a_count_is_one_line_naming_its_len(user, capsys, length):
    source = "import torch\n\n\nclass Rows(torch.utils.data.Dataset):\n"
    source += f"    def __len__(self):\n        return {length}\n\n"
    source += "    def __getitem__(self, i):\n        return torch.zeros(5)\n"
    (user / "rows.py").write_text(source + "\n\ndef rows():\n    return Rows()\n")
    code, err = run(train_argv(user, "--out", user / "run", data="rows.py:rows"), capsys)
    said = f"rows.py:5: Rows.__len__ returned {length}: the length of a Dataset is its number"
    assert (code, said in err, err.endswith("datapoints, an integer >= 0")) == (2, True, True), err
    assert not (user / "run").exists()


@pytest.mark.parametrize("flag", ["--data", "--test-data"])
@pytest.mark.parametrize("bad", [np.nan, -np.inf])
def test_data_not_finite_in_a_late_row_are_named_before_training(user, capsys, flag, bad):
    x = np.random.default_rng(1).normal(size=(100, 5)).astype(np.float32)
    x[97, 3] = x[99, 0] = bad
    np.savez(user / "late.npz", x=x)
    given = {"data": "late.npz"} if flag == "--data" else {}
    extra = ["--test-data", user / "late.npz"] if flag == "--test-data" else []
    code, err = run(train_argv(user, "--out", user / "run", *extra, **given), capsys)
    shown = "NaN" if np.isnan(bad) else "-inf"
    assert code == 2 and err.endswith(
        f"late.npz: the array 'x' holds {shown} in row 97 (2 of its 100 rows hold NaN or "
        "infinite values): training and evaluation need finite data"
    ), err
    assert not (user / "run").exists()
