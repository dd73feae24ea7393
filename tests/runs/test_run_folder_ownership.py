"""What a run folder's writers may touch: only files they wrote. A foreign ``.lock`` or a file
named like a temporary file stays; ``--force`` keeps the user's same-named files aside; a
signal during a write leaves the previous files whole; results name the checkpoint they
scored; a finished run's resume does nothing."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_runs import TINY

from pyro_vae.app.cli import EXIT_INTERRUPTED, EXIT_TERMINATED, main
from pyro_vae.runs import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    HISTORY_FILE,
    LOCK_FILE,
    RunFolderLock,
    load_checkpoint,
)
from pyro_vae.runs.lock import lock_holder
from pyro_vae.util.tempnames import temporary_name, this_process, writer_of


def exit_status(argv) -> int:
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


def one_line(text: str) -> str:
    assert "Traceback" not in text and len(text.strip().splitlines()) == 1, text
    return text.strip()


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file of ``folder`` (hidden ones too): its bytes and its modification time."""
    return {
        p.name: (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.iterdir())
        if p.is_file()
    }


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def stale_temporary(folder: Path, target: str) -> Path:
    """A temporary file of pyro-vae's format for ``target`` whose writer is gone."""
    name = temporary_name(target).replace(f"-{os.getpid()}-", f"-{dead_pid()}-", 1)
    assert writer_of(name) is not None and writer_of(name).gone()
    (folder / name).write_bytes(b"half")
    return folder / name


# the lock -----------------------------------------------------------------------------------

FOREIGN_LOCK = "another tool's lock\n"


def test_a_foreign_lock_file_is_refused_and_kept(tmp_path, capsys):
    crowded, alone = tmp_path / "crowded", tmp_path / "alone"
    for folder, others in ((crowded, ["a.txt", "b.txt", "c.txt", "d.txt"]), (alone, [])):
        folder.mkdir()
        (folder / LOCK_FILE).write_text(FOREIGN_LOCK)
        for name in others:
            (folder / name).write_text(name)
        before = snapshot(folder)
        for force in ([], ["--force"]):
            assert exit_status(["train", *TINY, "--out", str(folder), *force]) == 2
            line = one_line(capsys.readouterr().err)
            assert f"{folder / LOCK_FILE} is not a pyro-vae lock file" in line, line
            assert snapshot(folder) == before


def test_a_foreign_lock_in_a_run_folder_stops_resume_and_stays(run_dir, capsys):
    (run_dir / LOCK_FILE).write_text(FOREIGN_LOCK)
    before = snapshot(run_dir)
    assert exit_status(["train", "--resume", str(run_dir), "--epochs", "2", "--quiet"]) == 2
    assert "is not a pyro-vae lock file" in one_line(capsys.readouterr().err)
    assert snapshot(run_dir) == before


def test_an_empty_lock_file_is_foreign_once_no_creator_fills_it(tmp_path, monkeypatch):
    import pyro_vae.runs.lock as lock_module
    from pyro_vae.util.errors import CheckpointError

    monkeypatch.setattr(lock_module, "EMPTY_LOCK_WAIT_S", 0.05)
    (tmp_path / LOCK_FILE).write_bytes(b"")
    with pytest.raises(CheckpointError, match="is not a pyro-vae lock file"):
        RunFolderLock(tmp_path).acquire()
    assert (tmp_path / LOCK_FILE).read_bytes() == b""


def test_the_lock_names_its_writer_and_only_its_writer_removes_it(tmp_path):
    lock = RunFolderLock(tmp_path).acquire()
    assert lock_holder((tmp_path / LOCK_FILE).read_text()) == this_process()
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()
    lock = RunFolderLock(tmp_path).acquire()
    (tmp_path / "other").write_text(FOREIGN_LOCK)
    os.replace(tmp_path / "other", tmp_path / LOCK_FILE)  # put there by someone else
    lock.release()
    assert (tmp_path / LOCK_FILE).read_text() == FOREIGN_LOCK


# temporary files ----------------------------------------------------------------------------

LOOK_ALIKES = [
    f".{CHECKPOINT_FILE}.backup.tmp",
    f".{HISTORY_FILE}.mine1234.tmp",
    ".eval-test.json.k3y.tmp",
]


def test_temporary_names_name_their_writer_and_fit_the_file_system():
    from pyro_vae.util.tempnames import Writer

    me = this_process()
    name = temporary_name("x" * 250)
    assert len(name) <= 255 and writer_of(name) == me and not me.gone()
    assert writer_of(temporary_name("eval-test.json")) == me
    for foreign in LOOK_ALIKES + [".a.pv-zzzzzz-1-0123abcd-0.tmp", "notes.tmp"]:
        assert writer_of(foreign) is None, foreign
    assert Writer(me.host, me.pid, "ffffffff" if me.nonce != "ffffffff" else "0").gone()
    assert not Writer("000000" if me.host != "000000" else "111111", dead_pid(), me.nonce).gone()


def test_files_named_like_temporary_files_are_never_removed(run_dir, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    for folder in (run_dir, mine):
        for name in LOOK_ALIKES:
            (folder / name).write_text("the user's")
    assert main(["train", *TINY, "--out", str(mine), "--force"]) == 0
    assert main(["train", "--resume", str(run_dir), "--epochs", "2", "--quiet"]) == 0
    assert main(["evaluate", str(run_dir), "--particles", "2", "--limit", "8", "--quiet"]) == 0
    for folder in (run_dir, mine):
        for name in LOOK_ALIKES:
            assert (folder / name).read_text() == "the user's", (folder, name)


def _cvae_run(tmp_path) -> Path:
    out = tmp_path / "cvae"
    assert main(["train", *TINY, "--model", "cvae", "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize(
    "argv, targets, result",
    [
        (
            ["evaluate", "{run}", "--particles", "2", "--limit", "8", "--quiet"],
            ["eval-test.json", "eval-test.nc", "gap-test.png"],
            "eval-test.json",
        ),
        (
            [
                "evaluate",
                "{run}",
                "--ais",
                "--ais-steps",
                "2",
                "--chains",
                "2",
                "--limit",
                "4",
                "--quiet",
            ],
            ["ais-test.json", "ais-test.nc"],
            "ais-test.json",
        ),
        (
            ["bdmc", "{run}", "--num", "4", "--ais-steps", "2", "--chains", "2"],
            ["bdmc.json"],
            "bdmc.json",
        ),
        (["sample", "{run}", "--num", "4"], ["samples-0.png"], None),
        (
            ["classify", "{cvae}", "--particles", "2", "--limit", "8"],
            ["classify-test.json", "confusion-test.png"],
            "classify-test.json",
        ),
        (
            ["train", "--resume", "{run}", "--epochs", "2", "--quiet"],
            [CHECKPOINT_FILE, HISTORY_FILE, "samples.png"],
            None,
        ),
    ],
)
def test_every_command_sweeps_what_a_killed_writer_left_and_writes_single_temporaries(
    run_dir, tmp_path, monkeypatch, argv, targets, result
):
    import pyro_vae.util.tempnames as tempnames

    folder = _cvae_run(tmp_path) if "{cvae}" in argv else run_dir
    argv = [arg.format(run=run_dir, cvae=folder) for arg in argv]
    stale = [stale_temporary(folder, target) for target in targets]
    live = folder / temporary_name("eval-test.json")  # this process's: a write under way
    live.write_bytes(b"")
    named = []
    real = tempnames.temporary_name
    monkeypatch.setattr(
        tempnames,
        "temporary_name",
        lambda target, *rest: named.append(target) or real(target, *rest),
    )
    assert main(argv) == 0
    assert not any(path.exists() for path in stale)
    assert live.exists()
    assert named and not [target for target in named if target.endswith(".tmp")], named
    if result is not None:  # the results record the epoch of the checkpoint they scored
        assert json.loads((folder / result).read_text())["checkpoint_epoch"] == 1


def test_evaluation_records_the_epoch_of_the_checkpoint_it_scored(run_dir):
    assert main(["train", "--resume", str(run_dir), "--epochs", "2", "--quiet"]) == 0
    assert main(["evaluate", str(run_dir), "--particles", "2", "--limit", "8", "--quiet"]) == 0
    saved = json.loads((run_dir / "eval-test.json").read_text())
    assert saved["checkpoint_epoch"] == load_checkpoint(run_dir)["history"]["epoch"][-1] == 2


# --force ------------------------------------------------------------------------------------


@pytest.mark.parametrize("through_link", [False, True])
def test_force_keeps_the_users_same_named_files_aside_and_says_so(tmp_path, capsys, through_link):
    real = tmp_path / "mine"
    real.mkdir()
    (real / HISTORY_FILE).write_text("my history")
    (real / "samples.png").write_bytes(b"my picture")
    (real / "samples.png.orig").write_bytes(b"an older one")
    out = real
    if through_link:
        out = tmp_path / "link"
        out.symlink_to(real, target_is_directory=True)
    assert main(["train", *TINY, "--out", str(out), "--force"]) == 0
    line = one_line(capsys.readouterr().err)
    assert line == (
        f"pyro-vae: {out} holds {HISTORY_FILE}, samples.png, which the run "
        f"writes: kept as {HISTORY_FILE}.orig, samples.png.orig-2"
    )
    assert (real / f"{HISTORY_FILE}.orig").read_text() == "my history"
    assert (real / "samples.png.orig-2").read_bytes() == b"my picture"
    assert (real / "samples.png.orig").read_bytes() == b"an older one"
    assert json.loads((real / HISTORY_FILE).read_text())["epoch"] == [1]


def test_a_forced_start_that_trains_nothing_puts_the_users_files_back(
    tmp_path, monkeypatch, capsys
):
    from pyro_vae.train.loop import Loop

    out = tmp_path / "mine"
    out.mkdir()
    (out / HISTORY_FILE).write_text("my history")
    before = snapshot(out)

    def interrupt(self, hooks=()):
        assert not (out / HISTORY_FILE).exists()  # kept aside while the run starts
        raise KeyboardInterrupt

    monkeypatch.setattr(Loop, "train_epoch", interrupt)
    assert main(["train", *TINY, "--out", str(out), "--force"]) == EXIT_INTERRUPTED
    assert {name: data for name, (data, _) in snapshot(out).items()} == {
        name: data for name, (data, _) in before.items()
    }


def test_a_forced_start_on_a_full_disk_puts_the_users_files_back(tmp_path, monkeypatch, capsys):
    import errno

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    out = tmp_path / "mine"
    out.mkdir()
    (out / HISTORY_FILE).write_text("my history")
    monkeypatch.setattr("torch.save", no_space)
    assert exit_status(["train", *TINY, "--out", str(out), "--force"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[0].startswith("pyro-vae: ") and "Traceback" not in err[1]
    assert err[1].endswith("no space left on device; no epoch was saved"), err
    assert sorted(p.name for p in out.iterdir()) == [HISTORY_FILE]
    assert (out / HISTORY_FILE).read_text() == "my history"


# signals during a write ---------------------------------------------------------------------


class _SignalOnWrite:
    """A file whose third write raises ``signum`` first: the signal arrives inside
    ``torch.save``'s callback into Python, in the middle of the archive."""

    def __init__(self, stream, signum):
        self.stream, self.signum, self.writes = stream, signum, 0

    def write(self, data):
        self.writes += 1
        if self.writes == 3:
            signal.raise_signal(self.signum)
        return self.stream.write(data)

    def __getattr__(self, name):
        return getattr(self.stream, name)


@pytest.mark.parametrize(
    "signum, status, word",
    [
        (signal.SIGTERM, EXIT_TERMINATED, "terminated"),
        (signal.SIGINT, EXIT_INTERRUPTED, "interrupted"),
    ],
)
def test_a_signal_during_a_checkpoint_write_is_one_line_and_keeps_the_last_set(
    run_dir, monkeypatch, capsys, signum, status, word
):
    import torch

    save = torch.save

    def save_with_signal(state, stream):
        save(state, _SignalOnWrite(stream, signum))

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    before = snapshot(run_dir)
    monkeypatch.setattr(torch, "save", save_with_signal)
    try:
        assert main(["train", "--resume", str(run_dir), "--epochs", "2", "--quiet"]) == status
    finally:
        signal.signal(signal.SIGINT, previous)
    assert one_line(capsys.readouterr().err) == f"pyro-vae train: {word}"
    assert {name: data for name, (data, _) in snapshot(run_dir).items()} == {
        name: data for name, (data, _) in before.items()
    }  # the previous set, whole


# a finished run -----------------------------------------------------------------------------


def test_resuming_a_finished_run_does_nothing(run_dir, monkeypatch, capsys):
    import pyro_vae.evaluate as evaluate
    import pyro_vae.runs.plots as plots
    import pyro_vae.train as train

    calls = []
    for module, name in (
        (train, "fit"),
        (evaluate, "evaluate_dataset"),
        (plots, "write_run_plots"),
    ):
        monkeypatch.setattr(module, name, lambda *a, name=name, **k: calls.append(name))
    before = snapshot(run_dir)
    assert main(["train", "--resume", str(run_dir)]) == 0
    assert main(["train", "--resume", str(run_dir), "--epochs", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"{run_dir} is already at epoch 1; nothing to do"] * 2
    assert calls == [] and snapshot(run_dir) == before


def test_fit_resuming_a_finished_run_from_python_returns_it_without_training(tmp_path, monkeypatch):
    """fit(resume=True) at the epochs a run finished at: the run's model and history back,
    nothing trained, estimated or drawn, the folder as it was."""
    import sys

    from user_models import FactorAnalysis, fa_data

    from pyro_vae import fit

    x = fa_data(40)
    options = dict(
        test_data=fa_data(20, seed=1), epochs=2, batch_size=20, progress=False, final_particles=5
    )
    first = fit(FactorAnalysis(), x, run_dir=tmp_path / "run", **options)
    before = snapshot(tmp_path / "run")
    monkeypatch.setattr(
        sys.modules["pyro_vae.train.engine"],
        "run_epochs",
        lambda *a, **k: pytest.fail("a finished run was trained again"),
    )
    again = fit(FactorAnalysis(), x, run_dir=tmp_path / "run", resume=True, **options)
    assert again.history.epoch == first.history.epoch == [1, 2]
    assert again.history.extra["final"] == first.history.extra["final"]
    assert all(
        torch.equal(a, b)
        for a, b in zip(again.model.state_dict().values(), first.model.state_dict().values())
    )
    assert snapshot(tmp_path / "run") == before


def test_a_run_killed_during_its_final_estimate_finishes_on_resume(run_dir, capsys):
    history = json.loads((run_dir / HISTORY_FILE).read_text())
    history.pop("final"), history.pop("finished_at_epoch")  # as before the end of the run
    (run_dir / HISTORY_FILE).write_text(json.dumps(history))
    assert main(["train", "--resume", str(run_dir)]) == 0
    assert "nothing to do" not in capsys.readouterr().out
    finished = json.loads((run_dir / HISTORY_FILE).read_text())
    assert finished["epoch"] == [1] and "final" in finished
    assert finished["finished_at_epoch"] == 1
    assert json.loads((run_dir / CONFIG_FILE).read_text())["epochs"] == 1


def test_an_unheld_write_interrupted_inside_a_library_raises_the_interruption(tmp_path):
    """A write that lets signals through (a download) ends with the signal's exception, not
    with the error of the library whose callback it interrupted."""
    import torch

    from pyro_vae.util.io import atomic_path

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with (
                atomic_path(tmp_path / "state.pt", hold_signals=False) as tmp,
                open(tmp, "wb") as stream,
            ):
                torch.save({"weights": torch.zeros(3)}, _SignalOnWrite(stream, signal.SIGINT))
    finally:
        signal.signal(signal.SIGINT, previous)
    assert list(tmp_path.iterdir()) == []
