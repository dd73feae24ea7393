"""The run folder under stress: concurrent writers, missing or damaged files, bad --out paths,
interruptions, a full disk and invalid fields. Every refusal is one stderr line and exit
status 2, and leaves the folder as it was (or resumable)."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import safetensors
import torch
from tiny_runs import TINY

from pyro_vae import fit
from pyro_vae.app.cli import EXIT_TERMINATED, main
from pyro_vae.runs import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    HISTORY_FILE,
    LOCK_FILE,
    WEIGHTS_FILE,
    RunFolderLock,
    load_checkpoint,
    read_run_config,
)
from pyro_vae.runs.lock import lock_holder, lock_text
from pyro_vae.util.errors import CheckpointError
from pyro_vae.util.tempnames import Writer, host_tag, temporary_name, this_process

REPO = Path(__file__).resolve().parents[2]


def exit_status(argv) -> int:
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and "[Errno" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    return err.strip()


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file of ``folder`` (hidden ones too) and its bytes."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    return sorted(
        p.name for p in folder.iterdir() if p.name.endswith(".tmp") or p.name == LOCK_FILE
    )


def dead_pid() -> int:
    """The pid of a process that has ended (and was reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def stale_temporary(folder: Path, target: str, pid: int | None = None) -> Path:
    """A temporary file of pyro-vae's format for ``target``, left by a process that is gone."""
    name = temporary_name(target).replace(f"-{os.getpid()}-", f"-{pid or dead_pid()}-", 1)
    path = folder / name
    path.write_bytes(b"half")
    return path


def cli(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pyro_vae", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def history_of(folder: Path) -> dict:
    history = json.loads((folder / HISTORY_FILE).read_text())
    history.pop("seconds")
    return history


# 1. one writer at a time ------------------------------------------------------------------


def test_a_second_writer_is_refused_without_touching_the_folder(run_dir, capsys):
    before = snapshot(run_dir)
    with RunFolderLock(run_dir):
        held = snapshot(run_dir)
        assert lock_holder(held[LOCK_FILE].decode()) == this_process()
        assert exit_status(["train", "--resume", str(run_dir), "--epochs", "2", "--quiet"]) == 2
        assert f"is being written by another process (pid {os.getpid()})" in one_line(capsys)
        assert exit_status(["train", *TINY, "--out", str(run_dir)]) == 2
        assert "is being written by another process" in one_line(capsys)
        assert snapshot(run_dir) == held
    assert snapshot(run_dir) == before  # the lock file goes with its holder


def test_two_concurrent_trainings_into_one_folder_leave_one_consistent_run(tmp_path):
    out = tmp_path / "run"
    argv = [
        "train",
        "--epochs",
        "2",
        "--batch-size",
        "512",
        "--latent-dim",
        "2",
        "--hidden",
        "8",
        "--device",
        "cpu",
        "--quiet",
        "--out",
        str(out),
    ]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "pyro_vae", *argv, "--seed", str(seed)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in (1, 2)
    ]
    results = [(proc.wait(timeout=180), *proc.communicate()) for proc in procs]
    statuses = sorted(status for status, _, _ in results)
    assert statuses == [0, 2], results
    winner = [seed for seed, (status, _, _) in zip((1, 2), results) if status == 0][0]
    err = [err for status, _, err in results if status == 2][0].strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "is being written by another process (pid " in err or "already holds a run" in err, err
    config = json.loads((out / CONFIG_FILE).read_text())
    state = load_checkpoint(out)
    assert config["seed"] == state["config"]["seed"] == winner
    assert state["history"]["epoch"] == [1, 2]
    assert leftovers(out) == []


def test_a_lock_file_left_by_a_killed_process_is_not_a_held_lock(run_dir, capsys):
    # a lock of pyro-vae's format whose process is gone: nothing holds it, it is taken over
    (run_dir / LOCK_FILE).write_text(lock_text(Writer(host_tag(), dead_pid(), "0123abcd")))
    assert main(["train", "--resume", str(run_dir), "--epochs", "2", "--quiet"]) == 0
    assert history_of(run_dir)["epoch"] == [1, 2]
    assert leftovers(run_dir) == []


# 2. the checkpoint is the source of truth -------------------------------------------------


def test_a_missing_config_json_is_rebuilt_from_the_checkpoint(run_dir, tmp_path, capsys):
    saved = json.loads((run_dir / CONFIG_FILE).read_text())
    (run_dir / CONFIG_FILE).unlink()
    config, model_class = read_run_config(run_dir)
    assert config.to_dict() == saved and model_class is None
    assert main(["sample", str(run_dir), "--num", "4", "--output", str(tmp_path / "grid.png")]) == 0
    assert main(["train", "--resume", str(run_dir), "--epochs", "2", "--quiet"]) == 0
    assert json.loads((run_dir / CONFIG_FILE).read_text()) == {**saved, "epochs": 2}
    assert history_of(run_dir)["epoch"] == [1, 2]


def test_a_run_stopped_before_its_first_checkpoint_is_reported_then_resumed(
    trained_run, tmp_path, capsys
):
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    shutil.copy(trained_run / CONFIG_FILE, stopped / CONFIG_FILE)
    before = snapshot(stopped)
    assert exit_status(["train", *TINY, "--out", str(stopped)]) == 2
    assert "stopped before its first checkpoint" in one_line(capsys)
    assert snapshot(stopped) == before
    assert exit_status(["train", "--resume", str(stopped), "--lr", "0.1"]) == 2
    capsys.readouterr()
    # resuming trains it from epoch 1: the run an uninterrupted training gives
    assert main(["train", "--resume", str(stopped), "--quiet"]) == 0
    assert history_of(stopped) == history_of(trained_run)
    assert leftovers(stopped) == []


def test_an_interrupted_first_epoch_leaves_no_trace(tmp_path, monkeypatch, capsys):
    """The config.json written before training goes again when nothing was trained: the same
    command then starts afresh (only a process killed outright leaves it; see above)."""
    from pyro_vae.train.loop import Loop

    out = tmp_path / "new" / "run"

    def interrupt(self, hooks=()):
        assert json.loads((out / CONFIG_FILE).read_text())["epochs"] == 1  # written first
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(Loop, "train_epoch", interrupt)
        assert main(["train", *TINY, "--out", str(out)]) == 130
    # the interrupt came from this file, which the line names as it names a user's model
    assert one_line(capsys).startswith(f"pyro-vae train: interrupted in {__file__}:")
    assert not (tmp_path / "new").exists()
    assert main(["train", *TINY, "--out", str(out)]) == 0
    assert history_of(out)["epoch"] == [1]


def test_a_failed_start_leaves_no_trace(tmp_path, capsys):
    out = tmp_path / "new" / "run"
    assert (
        exit_status(
            [
                "train",
                "--dataset",
                "mnist",
                "--data-dir",
                str(tmp_path / "none"),
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 2
    )
    assert "does not exist" in one_line(capsys)
    assert not (tmp_path / "new").exists()


# 3. --out is checked before anything is trained -------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["train", *TINY, "--out", ""],
        ["train", "--resume", ""],
        ["train", *TINY, "--out", "  "],
        ["sample", ""],
    ],
)
def test_an_empty_path_is_refused(argv, capsys):
    assert exit_status(argv) == 2
    assert "the path is empty (an unset shell variable?)" in one_line(capsys)


def test_fit_refuses_an_empty_run_folder_path():
    with pytest.raises(CheckpointError, match="empty path"):
        fit(run_dir="", epochs=1, progress=False)


def test_out_paths_that_cannot_hold_a_run(tmp_path, monkeypatch, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert exit_status(["train", *TINY, "--out", str(a_file)]) == 2
    assert f"the run folder {a_file} is a file, not a folder" in one_line(capsys)
    assert exit_status(["train", *TINY, "--out", str(a_file / "run")]) == 2
    assert (
        f"cannot create the run folder {a_file / 'run'}: a part of the path is a file"
        in one_line(capsys)
    )

    def denied(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    with monkeypatch.context() as patch:
        patch.setattr(Path, "mkdir", denied)
        assert exit_status(["train", *TINY, "--out", str(tmp_path / "locked" / "run")]) == 2
    assert one_line(capsys).endswith(
        f"cannot create the run folder {tmp_path / 'locked' / 'run'}: permission denied"
    )
    assert a_file.read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["file"]

    read_only = tmp_path / "read-only"
    read_only.mkdir()
    real_open = os.open

    def no_write(path, *args, **kwargs):  # what a folder without write permission answers
        if str(path).endswith(LOCK_FILE):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(os, "open", no_write)
        assert exit_status(["train", *TINY, "--out", str(read_only)]) == 2
    assert one_line(capsys).endswith(
        f"cannot write to the run folder {read_only}: permission denied"
    )
    assert list(read_only.iterdir()) == []


def test_a_folder_of_other_files_needs_force(tmp_path, capsys):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert exit_status(["train", *TINY, "--out", str(out)]) == 2
    assert "holds 1 other file(s) (notes.txt) and no pyro-vae run" in one_line(capsys)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert main(["train", *TINY, "--out", str(out), "--force"]) == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / CHECKPOINT_FILE).exists()
    capsys.readouterr()
    assert exit_status(["train", *TINY, "--out", str(out), "--force"]) == 2  # never over a run
    assert "already holds a run" in one_line(capsys)
    assert exit_status(["train", "--resume", str(out), "--force"]) == 2
    assert "--force is for a new run's --out" in one_line(capsys)


# 4. temporary files and SIGTERM -----------------------------------------------------------


def test_temporary_files_of_an_interrupted_writer_are_swept_on_resume(run_dir):
    gone = dead_pid()
    stale = [
        stale_temporary(run_dir, name, gone).name
        for name in (CHECKPOINT_FILE, HISTORY_FILE, WEIGHTS_FILE, "eval-test.json")
    ]
    live = stale_temporary(run_dir, CHECKPOINT_FILE, os.getppid())  # a writer still running
    assert main(["train", "--resume", str(run_dir), "--epochs", "2", "--quiet"]) == 0
    assert leftovers(run_dir) == [live.name] and not set(stale) & set(os.listdir(run_dir))


def test_sigterm_ends_training_in_one_line_and_leaves_a_resumable_folder(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyro_vae", "train", *TINY, "--epochs", "100000", "--out", str(out)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not (out / CHECKPOINT_FILE).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_TERMINATED == 143, err[-2000:]  # the stderr says why
    assert err.strip() == "pyro-vae train: terminated"
    assert leftovers(out) == []
    epochs = load_checkpoint(out)["history"]["epoch"]
    assert epochs and history_of(out)["epoch"] == epochs
    done = cli("train", "--resume", str(out), "--epochs", str(len(epochs) + 1), "--quiet")
    assert done.returncode == 0, done.stderr
    assert history_of(out)["epoch"] == [*epochs, len(epochs) + 1]


def test_a_signal_during_the_renames_waits_for_the_whole_set(tmp_path, monkeypatch):
    from pyro_vae.util.io import atomic_files

    # Ctrl-C raises KeyboardInterrupt in an interactive process; one started in the
    # background (``cmd &``, nohup) inherits SIGINT ignored, so give it Python's handler
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    real_replace = os.replace

    def replace_then_interrupt(src, dst):
        real_replace(src, dst)
        signal.raise_signal(signal.SIGINT)  # Ctrl-C between two renames

    monkeypatch.setattr(os, "replace", replace_then_interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            with atomic_files() as files:
                files.write_text(tmp_path / "a", "1")
                files.write_text(tmp_path / "b", "2")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)


def test_main_restores_the_sigterm_handler(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    exit_status(["sample", str(tmp_path / "none")])
    assert signal.getsignal(signal.SIGTERM) is before


# 5. a full disk ---------------------------------------------------------------------------


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _torch_no_space(obj, stream):
    try:
        _no_space()
    except OSError:  # what torch.save raises when its file's write fails
        raise RuntimeError(
            "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"
        ) from None


def _safetensors_no_space(tensors, path):
    raise safetensors.SafetensorError(
        "Error while serializing: I/O error: No space left on device (os error 28)"
    )


@pytest.mark.parametrize(
    "target, writer, failing",
    [
        ("torch.save", _no_space, CHECKPOINT_FILE),
        ("torch.save", _torch_no_space, CHECKPOINT_FILE),
        ("safetensors.torch.save_file", _safetensors_no_space, WEIGHTS_FILE),
        ("pathlib.Path.write_text", _no_space, CONFIG_FILE),
    ],
)
def test_a_full_disk_while_checkpointing_keeps_the_last_complete_epoch(
    run_dir, monkeypatch, capsys, target, writer, failing
):
    before = snapshot(run_dir)
    with monkeypatch.context() as patch:
        patch.setattr(target, writer)
        assert exit_status(["train", "--resume", str(run_dir), "--epochs", "2", "--quiet"]) == 2
    line = one_line(capsys)
    assert f"cannot write {run_dir / failing}: no space left on device" in line
    assert "keeps its last complete epoch (1)" in line
    assert snapshot(run_dir) == before
    assert main(["train", "--resume", str(run_dir), "--epochs", "2", "--quiet"]) == 0


def test_a_full_disk_while_plotting_keeps_the_checkpoint(tmp_path, monkeypatch, capsys):
    from matplotlib.figure import Figure

    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(Figure, "savefig", _no_space)
        assert exit_status(["train", *TINY, "--out", str(out)]) == 2
    line = one_line(capsys)
    assert "no space left on device" in line and ".png" in line and ".tmp" not in line
    assert load_checkpoint(out)["history"]["epoch"] == [1]
    assert leftovers(out) == []


def test_a_full_disk_while_evaluating_keeps_the_previous_evaluation(run_dir, monkeypatch, capsys):
    from pyro_vae.evaluate.results import EvaluationResult

    argv = ["evaluate", str(run_dir), "--particles", "30", "--limit", "8", "--quiet"]
    assert main(argv) == 0
    capsys.readouterr()
    before = snapshot(run_dir)

    class Unwritable:
        def to_netcdf(self, path):
            raise RuntimeError("NetCDF: HDF error")  # a writer that names no errno

    with monkeypatch.context() as patch:
        patch.setattr(EvaluationResult, "to_inference_data", lambda self: Unwritable())
        patch.setattr(os, "statvfs", lambda folder: SimpleNamespace(f_bavail=0, f_frsize=4096))
        assert exit_status([*argv[:3], "40", *argv[4:]]) == 2
    assert f"cannot write {run_dir / 'eval-test.nc'}: no space left on device" in one_line(capsys)
    assert snapshot(run_dir) == before

    from matplotlib.figure import Figure

    with monkeypatch.context() as patch:
        patch.setattr(Figure, "savefig", _no_space)
        assert exit_status([*argv[:3], "40", *argv[4:]]) == 2
    assert one_line(capsys).endswith(
        f"cannot write {run_dir / 'gap-test.png'}: no space left on device"
    )
    assert snapshot(run_dir) == before


# 6. every field checked before use --------------------------------------------------------


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda c: c["model"].update(latent_dim=8.5),
            "config field model.latent_dim must be a whole number, got 8.5",
        ),
        (lambda c: c.update(lr="fast"), 'config field lr must be a finite number, got "fast"'),
        (lambda c: c.update(epochs=True), "config field epochs must be a whole number, got true"),
        (lambda c: c["model"].update(hidden=[8, "x"]), "config field model.hidden must be a list"),
        (lambda c: c.update(model=[1]), "config field model must be a mapping or null"),
        (lambda c: c.update(batch_size=0), "batch_size must be >= 1"),
    ],
)
def test_invalid_config_json_fields_are_named(run_dir, capsys, change, message):
    config = json.loads((run_dir / CONFIG_FILE).read_text())
    change(config)
    (run_dir / CONFIG_FILE).write_text(json.dumps(config))
    assert exit_status(["sample", str(run_dir)]) == 2
    assert message in one_line(capsys)


def _set(*keys, value):
    def change(state):
        target = state
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value

    return change


@pytest.mark.parametrize(
    "change, message",
    [
        (_set("history", value=[1]), "history must be a mapping of per-epoch lists, got a list"),
        (
            _set("history", "train_loss", value=[1.0, 2.0]),
            "history.train_loss holds 2 values for 1",
        ),
        (_set("history", "epoch", value=[3]), "history.epoch[0] must be 1"),
        (
            _set("config", "model", "latent_dim", value=8.5),
            "config field model.latent_dim must be a whole number, got 8.5",
        ),
        (_set("config", "seed", value="0"), 'config field seed must be a whole number, got "0"'),
        (
            _set("rng", "torch", value=torch.zeros(10, dtype=torch.uint8)),
            "rng.torch holds 10 bytes",
        ),
        (_set("rng", "data", value=torch.zeros(3)), "rng.data must be a 1-D uint8 tensor"),
        (
            _set("optimizer", "param_groups", 0, "lr", value="0.1"),
            "optimizer.param_groups[0].lr must be a finite number >= 0",
        ),
        (
            _set("model", "encoder.head.weight", value=[1.0]),
            "model['encoder.head.weight'] must be a tensor",
        ),
        (_set("model_class", value=5), "model_class must be a string"),
    ],
)
def test_invalid_checkpoint_fields_are_named(run_dir, capsys, change, message):
    state = torch.load(run_dir / CHECKPOINT_FILE, weights_only=True)
    change(state)
    torch.save(state, run_dir / CHECKPOINT_FILE)
    resume = ["train", "--resume", str(run_dir), "--epochs", "2", "--quiet"]
    for argv in (["sample", str(run_dir)], resume):
        assert exit_status(argv) == 2
        line = one_line(capsys)
        assert message in line and "cannot read checkpoint" in line, line


def test_a_wrong_size_random_state_is_named_on_resume(run_dir, capsys):
    before = snapshot(run_dir)
    state = torch.load(run_dir / CHECKPOINT_FILE, weights_only=True)
    state["rng"]["data"] = state["rng"]["data"][:16]
    torch.save(state, run_dir / CHECKPOINT_FILE)
    damaged = snapshot(run_dir)
    assert exit_status(["train", "--resume", str(run_dir), "--epochs", "2", "--quiet"]) == 2
    assert "random state rng.data holds 16 bytes where this data generator takes" in one_line(
        capsys
    )
    assert snapshot(run_dir) == damaged != before


def test_a_plain_pickle_checkpoint_is_refused_in_one_line_without_torch_warnings(tmp_path):
    import pickle

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    with open(run / CHECKPOINT_FILE, "wb") as f:
        pickle.dump({"model": {}}, f)
    done = subprocess.run(
        [sys.executable, "-m", "pyro_vae", "evaluate", str(run), "--particles", "2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    err = done.stderr.strip()
    assert len(err.splitlines()) == 1 and "Warning" not in err, err
    assert "damaged or not a pyro-vae checkpoint" in err


# 7. divergence, damaged weights, and what the messages name --------------------------------


def test_a_runaway_loss_is_a_divergence_not_a_finished_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert exit_status(["train", *TINY, "--lr", "1e6", "--out", str(out)]) == 2
    line = one_line(capsys)
    assert "the training loss rose to" in line and "from" in line and "at the first step" in line
    assert line.endswith("Try a smaller learning rate than --lr 1e+06"), line
    assert not out.exists()


def test_the_divergence_rule():
    from pyro_vae.train.loop import DIVERGENCE_RATIO, diverged

    assert not diverged(1e31, None)
    assert not diverged(50.0, 40.0) and not diverged(-1e6, 40.0)  # falling is never divergence
    assert diverged(40.0 + DIVERGENCE_RATIO * 40.0 + 1.0, 40.0)
    assert diverged(DIVERGENCE_RATIO + 0.5, -0.2)  # the scale is at least 1 nat


def test_a_tiny_fixed_gaussian_scale_is_named_as_the_cause(tmp_path, capsys):
    argv = [
        "train",
        *TINY,
        "--likelihood",
        "gaussian",
        "--obs-scale",
        "1e-30",
        "--out",
        str(tmp_path / "run"),
    ]
    assert exit_status(argv) == 2
    line = one_line(capsys)
    assert "--obs-scale 1e-30 is tiny" in line and "--lr" not in line, line


def test_a_checkpoint_with_nan_weights_is_refused_by_name(run_dir, capsys):
    state = torch.load(run_dir / CHECKPOINT_FILE, weights_only=True)
    name = next(iter(state["model"]))
    state["model"][name] = torch.full_like(state["model"][name], float("nan"))
    torch.save(state, run_dir / CHECKPOINT_FILE)
    damaged = snapshot(run_dir)
    for argv in (
        ["train", "--resume", str(run_dir), "--epochs", "2", "--quiet"],
        ["evaluate", str(run_dir), "--particles", "2", "--quiet"],
    ):
        assert exit_status(argv) == 2
        line = one_line(capsys)
        assert f"holds NaN or infinite weights ({name}" in line and "last good" not in line
    assert snapshot(run_dir) == damaged


def test_a_file_given_as_a_run_folder_is_called_a_file(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for argv in (
        ["evaluate", str(afile)],
        ["sample", str(afile)],
        ["train", "--resume", str(afile)],
    ):
        assert exit_status(argv) == 2
        assert one_line(capsys).endswith(f"{afile} is a file, not a run folder")


@pytest.mark.parametrize("rank, lines", [("0", 1), ("1", 0)])
def test_under_torchrun_one_rank_reports_a_user_error(tmp_path, monkeypatch, capsys, rank, lines):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", rank)
    assert exit_status(["train", "--resume", str(tmp_path / "missing")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == lines
