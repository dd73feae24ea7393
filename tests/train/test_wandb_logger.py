"""The W&B logger: the offline run's rows, read back from its ``run-ID.wandb`` file, are the
history's, its config config.json's, its images the run folder's plots; a resumed run continues
the same W&B run (a second offline segment of the same id) without logging an epoch twice; W&B's
variables choose the folder and project; W&B's service is gone after the run, and a run that
failed is marked so. Importing the package imports no wandb."""

import hashlib
import json
import math
import os
import struct
import sys
import zlib
from pathlib import Path

import pytest
from imports import top_level_modules_after
from user_models import FactorAnalysis, fa_data

from pyro_vae import fit, load_digits
from pyro_vae.app.cli import main
from pyro_vae.train import Callback

REPO = Path(__file__).resolve().parents[2]
SMALL = ["--batch-size", "256", "--latent-dim", "2", "--hidden", "16", "--device", "cpu", "--quiet"]
EPOCH_METRICS = {"train/loss": "train_loss", "test/elbo": "test_elbo", "train/seconds": "seconds"}
WANDB_VARIABLES = ("WANDB_MODE", "WANDB_PROJECT", "WANDB_DIR", "WANDB_RUN_ID", "WANDB_RESUME")


@pytest.fixture
def wandb(monkeypatch):
    """The wandb module, with the environment of a user who set none of W&B's variables."""
    module = pytest.importorskip("wandb")
    for name in WANDB_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return module


# W&B offers no public reader of an offline run (``wandb sync`` uploads it); its ``.wandb`` file
# is a LevelDB-style record log of ``wandb_internal_pb2.Record`` messages: a 7-byte header, then
# 32 KiB blocks of chunks, each with a CRC-32 (over its type byte and data), a length and a type
# (full, first, middle, last). The tests read it with W&B's generated protobuf classes (an
# internal module, used here only, never by the package).
HEADER = b":W&B\xe1\xbe\x00"
BLOCK, CHUNK_HEADER = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _records(path):
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[: len(HEADER)] == HEADER
    position, parts = len(HEADER), b""
    while position + CHUNK_HEADER <= len(data):
        left = BLOCK - position % BLOCK
        checksum, length, kind = struct.unpack("<IHB", data[position : position + CHUNK_HEADER])
        if left < CHUNK_HEADER or (kind == 0 and length == 0):  # a block's padding
            position += left
            continue
        chunk = data[position + CHUNK_HEADER : position + CHUNK_HEADER + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == checksum
        position += CHUNK_HEADER + length
        parts += chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


def _put(mapping, item):
    """An item of a history or summary record into ``mapping`` (a nested key, such as an
    image's fields, as nested mappings)."""
    *outer, last = [item.key] if item.key else list(item.nested_key)
    for part in outer:
        mapping = mapping.setdefault(part, {})
    mapping[last] = json.loads(item.value_json)


def _read(wandb_dir):
    """The offline segments of ``wandb_dir`` (``RUN_DIR/wandb``), oldest first, as one run:
    its id and project, its rows, config, summary and each segment's exit code."""
    segments = sorted(Path(wandb_dir).glob("offline-run-*"))
    run = {"ids": [], "rows": [], "config": {}, "summary": {}, "exit_codes": []}
    for segment in segments:
        for record in _records(next(segment.glob("run-*.wandb"))):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run["ids"].append(record.run.run_id)
                run["project"], run["name"] = record.run.project, record.run.display_name
            elif kind == "history":
                row = {}
                for item in record.history.item:
                    _put(row, item)
                run["rows"].append(row)
            elif kind == "summary":
                for item in record.summary.update:
                    _put(run["summary"], item)
            elif kind == "exit":
                run["exit_codes"].append(record.exit.exit_code)
            if kind in ("run", "config"):
                updates = record.run.config.update if kind == "run" else record.config.update
                for item in updates:
                    _put(run["config"], item)
    run["config"].pop("_wandb", None)
    return run


def _points(run, name, axis="epoch"):
    return [(row[axis], row[name]) for row in run["rows"] if name in row]


def _steps_per_epoch(batch_size=256):
    return math.ceil(len(load_digits().train.images) / batch_size)


def _services():
    """This process's wandb-core children (Linux's /proc; elsewhere none are seen)."""
    children = []
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            name = (entry / "comm").read_text().strip()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == os.getpid() and name.startswith("wandb"):
            children.append(name)
    return children


def test_the_offline_runs_rows_config_and_images_are_the_run_folders(tmp_path, wandb):
    hooks = (sys.exit, sys.excepthook)
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--epochs", "2", "--log", "wandb", "--out", str(out)]) == 0
    history = json.loads((out / "history.json").read_text())
    assert history["wandb"]["project"] == "pyro-vae" and history["wandb"]["dir"] is None
    run = _read(out / "wandb")
    assert run["ids"] == [history["wandb"]["id"]]
    assert (run["project"], run["name"], run["exit_codes"]) == ("pyro-vae", "run", [0])
    for name, key in EPOCH_METRICS.items():
        assert _points(run, name) == list(zip(history["epoch"], history[key]))
    assert _points(run, "train/beta") == [(1, 1.0), (2, 1.0)]
    assert _points(run, "train/lr") == [(1, 3e-3), (2, 3e-3)]
    final = history["final"]
    assert _points(run, "final/test_log_px") == [(2, final["test_log_px"])]
    assert run["summary"]["final/test_gap"] == final["test_gap"]
    steps = _points(run, "train/step_loss", "train/step")
    assert [step for step, _ in steps] == list(range(1, 2 * _steps_per_epoch() + 1))
    for row in run["rows"]:  # W&B's step: the run's step count at the row's last step
        expected = row["epoch"] * _steps_per_epoch() if "epoch" in row else row["train/step"]
        assert row["_step"] == expected
    assert run["config"] == json.loads((out / "config.json").read_text())
    images = {
        name: v for row in run["rows"] for name, v in row.items() if name.startswith("plots/")
    }
    plots = {
        f"plots/{p.stem}": hashlib.sha256(p.read_bytes()).hexdigest() for p in out.glob("*.png")
    }
    assert {name: image["sha256"] for name, image in images.items()} == plots
    assert len(plots) == 4 and {image["_type"] for image in images.values()} == {"image-file"}
    assert _services() == [] and (sys.exit, sys.excepthook) == hooks  # W&B's, given back


def test_a_resumed_run_continues_the_same_wandb_run_without_an_epoch_twice(
    tmp_path, wandb, monkeypatch
):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("WANDB_PROJECT", "digits")
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--epochs", "2", "--log", "wandb", "--out", str(out)]) == 0
    first = json.loads((out / "history.json").read_text())["wandb"]
    assert first["dir"] == str(tmp_path / "elsewhere") and first["project"] == "digits"
    monkeypatch.delenv("WANDB_DIR")  # the resumed run keeps the recorded folder and project
    monkeypatch.delenv("WANDB_PROJECT")
    assert main(["train", "--resume", str(out), "--epochs", "3", "--log", "wandb"]) == 0
    history = json.loads((out / "history.json").read_text())
    assert history["wandb"] == first
    assert not (out / "wandb").exists()
    run = _read(tmp_path / "elsewhere" / "wandb")
    assert run["ids"] == [first["id"]] * 2 and run["project"] == "digits"
    assert _points(run, "train/loss") == list(zip([1, 2, 3], history["train_loss"]))
    steps = [step for step, _ in _points(run, "train/step_loss", "train/step")]
    assert steps == list(range(1, 3 * _steps_per_epoch() + 1))
    assert [epoch for epoch, _ in _points(run, "final/test_log_px")] == [2, 3]
    assert run["summary"]["final/test_log_px"] == history["final"]["test_log_px"]
    assert [row["_step"] for row in run["rows"]] == sorted(row["_step"] for row in run["rows"])


def test_a_run_logged_only_from_its_resume_gets_its_earlier_epochs(tmp_path, wandb):
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--epochs", "2", "--out", str(out)]) == 0
    assert main(["train", "--resume", str(out), "--epochs", "3", "--log", "wandb"]) == 0
    history = json.loads((out / "history.json").read_text())
    run = _read(out / "wandb")
    assert _points(run, "train/loss") == list(zip([1, 2, 3], history["train_loss"]))
    steps = [step for step, _ in _points(run, "train/step_loss", "train/step")]  # epoch 3's alone
    assert steps == list(range(2 * _steps_per_epoch() + 1, 3 * _steps_per_epoch() + 1))
    assert [epoch for epoch, _ in _points(run, "final/test_log_px")] == [3]


class Failing(Callback):
    def on_epoch_end(self, loop):
        if loop.epoch == 2:
            raise RuntimeError("stopped by the test")


def test_a_failed_run_is_marked_so_and_leaves_no_wandb_service(tmp_path, wandb):
    with pytest.raises(RuntimeError, match="stopped by the test"):
        fit(
            FactorAnalysis(),
            fa_data(64),
            batch_size=32,
            epochs=3,
            final_particles=0,
            progress=False,
            run_dir=tmp_path / "run",
            log="wandb",
            callbacks=[Failing()],
        )
    run = _read(tmp_path / "run" / "wandb")
    assert run["exit_codes"] == [1]
    assert [epoch for epoch, _ in _points(run, "train/loss")] == [1]  # the logger comes last
    assert _services() == []


def test_importing_the_package_imports_no_wandb():
    statements = "import pyro_vae, pyro_vae.train, pyro_vae.train.wandb_logger; pyro_vae.fit"
    assert top_level_modules_after(statements, ("wandb",)) == []


def test_a_mode_wandb_refuses_is_one_line_and_leaves_no_run_folder(
    tmp_path, wandb, monkeypatch, capsys
):
    monkeypatch.setenv("WANDB_MODE", "nosuchmode")
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--epochs", "1", "--log", "wandb", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith(
        f"pyro-vae train: error: --log wandb, W&B run in {out}: mode='nosuchmode': "
    )
    assert not out.exists() and _services() == []
