"""A careless or unlucky user's input, each case one line and a non-zero exit with the run
folder untouched: a damaged or edited config.json on --resume, an option the command does not
take, one AIS chain, memory that runs out while the program starts."""

import importlib
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
from cli_calls import one_line, status

from pyro_vae.util.memory import is_allocation_failure


def snapshot(folder: Path) -> dict[str, tuple[bool, bytes]]:
    """Every entry of ``folder``: whether it is a link, and a regular file's bytes."""
    return {
        p.name: (p.is_symlink(), p.read_bytes() if p.is_file() and not p.is_symlink() else b"")
        for p in sorted(folder.iterdir())
    }


def _truncated(config: Path) -> None:
    config.write_bytes(config.read_bytes()[:200])


def _edited(config: Path) -> None:
    raw = json.loads(config.read_text())
    config.write_text(json.dumps({**raw, "lr": raw["lr"] * 10}))


def _endless(config: Path) -> None:
    config.unlink()
    config.symlink_to("/dev/zero")


def _wrong_type(config: Path) -> None:
    raw = json.loads(config.read_text())
    config.write_text(json.dumps({**raw, "seed": "zero"}))


@pytest.mark.parametrize(
    "damage, expected",
    [
        (_truncated, r"cannot read .*config.json: Expecting"),
        (_edited, r"config.json differs from the config its checkpoint holds \(--lr\)"),
        (_endless, r"config.json is a device, not a regular file"),
        (_wrong_type, r"config field seed must be a whole number"),
    ],
)
def test_resume_refuses_a_damaged_or_edited_config_and_leaves_the_folder_as_it_was(
    run_dir, capsys, damage, expected
):
    import re

    damage(run_dir / "config.json")
    before = snapshot(run_dir)
    assert status(["train", "--resume", run_dir, "--epochs", "2", "--quiet"]) == 2
    line = one_line(capsys)
    assert re.search(expected, line), line
    assert line.endswith("move it aside to resume with the config the checkpoint holds")
    assert snapshot(run_dir) == before


def test_resume_goes_on_once_the_damaged_config_is_moved_aside(run_dir, capsys):
    _truncated(run_dir / "config.json")
    (run_dir / "config.json").rename(run_dir.parent / "config.json.damaged")
    assert status(["train", "--resume", run_dir, "--epochs", "2", "--quiet"]) == 0
    assert json.loads((run_dir / "config.json").read_text())["epochs"] == 2


@pytest.mark.parametrize(
    "argv, command",
    [
        (["classify", "RUN", "--quiet"], "classify"),
        (["sample", "RUN", "--epochs", "3"], "sample"),
        (["train", "--epochs", "1", "stray"], "train"),
    ],
)
def test_an_argument_the_command_does_not_take_is_named_by_that_command(capsys, argv, command):
    assert status(argv) == 2
    line = one_line(capsys)
    assert line.startswith(f"pyro-vae {command}: error: unrecognized arguments: "), line
    assert line.endswith(f"(see pyro-vae {command} --help)")


def test_one_ais_chain_gives_its_bounds_without_a_warning(run_dir, capsys, recwarn):
    assert status(["bdmc", run_dir, "--num", "2", "--ais-steps", "2", "--chains", "1"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert "1 chains, 2 steps" in captured.out
    assert not [w for w in recwarn if "degrees of freedom" in str(w.message)]


@pytest.mark.parametrize(
    "failure",
    [
        MemoryError(),
        ImportError("libtorch_cpu.so: failed to map segment from shared object"),
    ],
)
def test_memory_running_out_while_the_program_starts_is_one_line(monkeypatch, capsys, failure):
    launch = importlib.import_module("pyro_vae.app.launch")
    supervisor = importlib.import_module("pyro_vae.app.supervisor")
    module = types.ModuleType("pyro_vae.app.cli")

    def fail(name: str) -> object:
        raise failure

    module.__getattr__ = fail
    monkeypatch.setitem(sys.modules, "pyro_vae.app.cli", module)
    monkeypatch.setattr(supervisor, "supervised", lambda: False)

    def exit_now(code: int) -> None:
        raise SystemExit(code)

    monkeypatch.setattr(launch.os, "_exit", exit_now)
    with pytest.raises(SystemExit) as ended:
        launch.run()
    assert ended.value.code == 2
    assert one_line(capsys).startswith(
        "pyro-vae: error: out of memory while loading torch and Pyro: the memory this "
        "process may use (ulimit -v)"
    )


def test_a_library_that_cannot_be_mapped_late_is_an_allocation_failure():
    assert is_allocation_failure(ImportError("_core.so: failed to map segment from shared object"))
    assert not is_allocation_failure(ImportError("No module named 'scipy'"))


PAIR = """
import pyro, pyro.distributions as dist
from torch import nn


class Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.dec, self.enc = nn.Linear(2, 5), nn.Linear(5, 4)

    def model(self, x):
        pyro.module("pair", self)
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
"""


@pytest.fixture
def here(tmp_path, monkeypatch):
    """A folder holding a module and a package of the user's, the current folder and on
    ``sys.path`` as ``python -m`` puts it there."""
    folder = tmp_path / "work"
    (folder / "userpkg").mkdir(parents=True)
    (folder / "userpair.py").write_text(PAIR)
    (folder / "userpkg" / "__init__.py").write_text("")
    (folder / "userpkg" / "pairs.py").write_text(PAIR)
    monkeypatch.chdir(folder)
    monkeypatch.syspath_prepend(str(folder))
    return folder


def test_a_module_only_the_current_folder_holds_is_recorded_by_its_file(here, tmp_path):
    from pyro_vae.data.specs import absolute_spec

    assert absolute_spec("userpair:make") == f"{here / 'userpair.py'}:make"
    assert absolute_spec("json.decoder:JSONDecoder") == "json.decoder:JSONDecoder"
    assert absolute_spec("nosuchmodule:make") == "nosuchmodule:make"


def test_a_package_only_the_current_folder_holds_is_refused_in_one_line(here, capsys, tmp_path):
    import numpy as np

    np.savez(here / "binary.npz", x=(np.arange(320).reshape(64, 5) % 2).astype(np.float32))
    out = tmp_path / "run"
    argv = ["train", "--model-factory", "userpkg.pairs:make", "--data", "binary.npz"]
    assert status([*argv, "--out", out, "--quiet"]) == 2
    line = one_line(capsys)
    assert line == (
        f"pyro-vae train: error: userpkg.pairs is found only in the current folder ({here}), "
        "where a later command run elsewhere would not find it: give it as FILE.py:make, or "
        "put its folder on PYTHONPATH as an absolute path"
    )
    assert not out.exists()


def test_a_run_of_a_module_in_the_current_folder_is_evaluated_from_another(
    here, tmp_path, monkeypatch, capsys
):
    import numpy as np

    np.savez(here / "binary.npz", x=(np.arange(320).reshape(64, 5) % 2).astype(np.float32))
    out = tmp_path / "run"
    argv = ["train", "--model-factory", "userpair:make", "--data", "binary.npz", "--epochs", "1"]
    assert status([*argv, "--out", out, "--quiet"]) == 0
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "userpair", raising=False)
    sys.path.remove(str(here))
    capsys.readouterr()
    data = here / "binary.npz"
    assert status(["evaluate", out, "--data", data, "--particles", "2", "--quiet"]) == 0
    assert (out / "eval-data-binary.json").is_file()


KILLED_IN_ITS_FIRST_STEP = PAIR.replace("import pyro,", "import os, signal\nimport pyro,").replace(
    'def model(self, x):\n        pyro.module("pair", self)',
    "def model(self, x):\n        os.kill(os.getpid(), signal.SIGKILL)",
)


@pytest.mark.skipif(os.name != "posix", reason="the supervisor is POSIX only")
def test_the_users_files_kept_aside_by_force_are_put_back_after_a_crash(tmp_path):
    import numpy as np

    (tmp_path / "dying.py").write_text(KILLED_IN_ITS_FIRST_STEP)
    np.savez(tmp_path / "binary.npz", x=(np.arange(320).reshape(64, 5) % 2).astype(np.float32))
    out = tmp_path / "out"
    out.mkdir()
    (out / "history.json").write_text("the user's own history")
    (out / "notes.txt").write_text("the user's notes")
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "GROUP_RANK")}
    argv = ["train", "--model-factory", "dying.py:make", "--data", "binary.npz", "--force"]
    ended = subprocess.run(
        [sys.executable, "-m", "pyro_vae", *argv, "--out", str(out), "--quiet"],
        cwd=tmp_path,
        env={**env, "TMPDIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ended.returncode != 0
    assert "history.json.orig" in ended.stderr  # said when it was kept aside
    assert (out / "history.json").read_text() == "the user's own history"
    assert not (out / "history.json.orig").exists()
    assert (out / "notes.txt").read_text() == "the user's notes"
    assert sorted(p.name for p in out.iterdir()) == ["history.json", "notes.txt"]


@pytest.mark.parametrize(
    "data, expected",
    [
        (
            "userpair.py:empty",
            "the data must hold at least one datapoint (a first dimension of size >= 1)",
        ),
        ("empty.npz", "the data must hold at least one datapoint (a first dimension of size >= 1)"),
    ],
)
def test_data_without_rows_are_one_line(here, tmp_path, capsys, data, expected):
    import numpy as np

    with open(here / "userpair.py", "a") as source:
        source.write("\n\ndef empty():\n    import torch\n    return torch.zeros(0, 5)\n")
    np.savez(here / "empty.npz", x=np.zeros((0, 5), dtype=np.float32))
    out = tmp_path / "run"
    argv = ["train", "--model-factory", "userpair.py:make", "--data", data, "--out", out]
    assert status([*argv, "--quiet"]) == 2
    assert one_line(capsys) == f"pyro-vae train: error: {expected}"
    assert not out.exists()


def test_a_factory_file_that_does_not_exist_is_named_plainly(here, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--model-factory", "missing.py:make", "--data", "x.npz", "--out", out]
    assert status(argv) == 2
    assert one_line(capsys) == f"pyro-vae train: error: no file {here / 'missing.py'}"


def test_a_factory_that_returns_no_pair_names_the_type_it_returned(here, tmp_path, capsys):
    import numpy as np

    with open(here / "userpair.py", "a") as source:
        source.write("\n\ndef number():\n    return 3\n")
    np.savez(here / "binary.npz", x=(np.arange(320).reshape(64, 5) % 2).astype(np.float32))
    out = tmp_path / "run"
    argv = ["train", "--model-factory", "userpair.py:number", "--data", "binary.npz"]
    assert status([*argv, "--out", out, "--quiet"]) == 2
    assert one_line(capsys).startswith(
        f"pyro-vae train: error: {here / 'userpair.py'}:number returned an object of type int, "
        "not a model/guide pair"
    )
    assert not out.exists()
