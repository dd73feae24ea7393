"""Sizes the machine cannot hold are refused before allocation, k-hat's memory does not grow with
K, a writer that crashes its process is one line, and a long but valid file name is written."""

import errno
import json
import os
import signal
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_runs import TINY

from pyro_vae.app.cli import main
from pyro_vae.evaluate.khat import ParetoTail, arviz_module, pareto_khat, tail_size
from pyro_vae.util.io import WriteError, write_in_child
from pyro_vae.util.memory import (
    MemoryLimitError,
    format_bytes,
    is_allocation_failure,
    limit,
    parse_size,
    require,
)

HUGE = "1000000000"


def exit_status(argv) -> int:
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    return err.strip()


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# --- memory estimated before allocation ----------------------------------------------------


@pytest.mark.parametrize(
    "text, size",
    [
        ("512M", 512 * 2**20),
        ("4G", 4 * 2**30),
        ("1.5GiB", int(1.5 * 2**30)),
        ("1000", 1000),
        ("2kb", 2048),
    ],
)
def test_sizes_parse_in_binary_units(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["12Q", "-1G", "0", "G"])
def test_bad_sizes_are_refused(text):
    with pytest.raises(Exception, match="memory size must"):
        parse_size(text)


def test_a_limit_refuses_what_exceeds_it_and_allows_what_fits():
    with limit("1M"):
        require(2**19, "half a MiB")
        with pytest.raises(MemoryLimitError, match=r"2\.0 MiB .* memory limit of 1\.0 MiB"):
            require(2**21, "two MiB")
    require(2**21, "two MiB")  # the machine has that much free
    assert format_bytes(3 * 2**40) == "3.0 TiB"


@pytest.mark.parametrize(
    "argv, what",
    [
        (["train", *TINY, "--latent-dim", HUGE], "parameters"),
        (["train", *TINY, "--particles", HUGE], "datapoint-particles per step"),
        (["train", *TINY, "--hidden", HUGE], "parameters"),
    ],
)
def test_impossible_training_sizes_are_refused_before_allocation(tmp_path, capsys, argv, what):
    out = tmp_path / "run"
    assert exit_status([*argv, "--out", str(out)]) == 2
    line = one_line(capsys)
    assert what in line and "TiB of memory, more than the" in line, line
    assert not out.exists()


def test_max_memory_refuses_a_run_that_would_fit_the_machine(tmp_path, capsys):
    out = tmp_path / "run"
    assert exit_status(["train", *TINY, "--out", str(out), "--max-memory", "1K"]) == 2
    assert "more than the memory limit of 1.0 KiB (--max-memory)" in one_line(capsys)
    assert not out.exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["sample", "RUN", "--num", "100000", "--max-memory", "100M"],
        ["evaluate", "RUN", "--particles", HUGE, "--particle-chunk", HUGE],
        ["evaluate", "RUN", "--particles", "100", "--max-memory", "10K"],
        ["evaluate", "RUN", "--ais", "--chains", HUGE],
        ["bdmc", "RUN", "--chains", HUGE],
    ],
)
def test_impossible_sampling_and_evaluation_sizes_are_refused(run_dir, capsys, argv):
    before = snapshot(run_dir)
    assert exit_status([str(run_dir) if a == "RUN" else a for a in argv]) == 2
    assert "of memory, more than the" in one_line(capsys)
    assert snapshot(run_dir) == before


def test_a_huge_latent_dimension_in_config_json_is_refused_on_every_command(run_dir, capsys):
    from pyro_vae.runs import CHECKPOINT_FILE, CONFIG_FILE

    config = json.loads((run_dir / CONFIG_FILE).read_text())
    config["model"]["latent_dim"] = 10**12
    (run_dir / CONFIG_FILE).write_text(json.dumps(config))
    state = torch.load(run_dir / CHECKPOINT_FILE, weights_only=True)
    state["config"]["model"]["latent_dim"] = 10**12
    torch.save(state, run_dir / CHECKPOINT_FILE)
    for argv in (
        ["evaluate", str(run_dir), "--particles", "2"],
        ["sample", str(run_dir)],
        ["train", "--resume", str(run_dir), "--epochs", "2", "--quiet"],
    ):
        assert exit_status(argv) == 2, argv
        line = one_line(capsys)
        assert "001,104 parameters" in line and "iB of memory, more than" in line, line


def test_an_allocation_failure_inside_a_users_pair_is_one_line(tmp_path, capsys):
    factory = tmp_path / "huge.py"
    factory.write_text("import torch\n\ndef make():\n    return torch.nn.Linear(2, 10 ** 13)\n")
    data = tmp_path / "x.npz"
    np.savez(data, np.zeros((8, 2), dtype=np.float32))
    assert (
        exit_status(
            [
                "train",
                "--model-factory",
                f"{factory}:make",
                "--data",
                str(data),
                "--out",
                str(tmp_path / "run"),
                "--epochs",
                "1",
                "--quiet",
            ]
        )
        == 2
    )
    assert "out of memory" in one_line(capsys)
    assert not (tmp_path / "run").exists()


def test_allocation_failures_are_recognised():
    assert is_allocation_failure(MemoryError())
    assert is_allocation_failure(RuntimeError("DefaultCPUAllocator: can't allocate memory"))
    assert not is_allocation_failure(RuntimeError("shape mismatch"))


# --- k-hat from a running top-M -------------------------------------------------------------


@pytest.mark.parametrize("num_particles", [21, 64, 500, 5000])
@pytest.mark.parametrize("scale", [0.3, 2.0, 8.0])
def test_khat_equals_arviz_psislw(num_particles, scale):
    torch.manual_seed(num_particles)
    log_weights = torch.randn(num_particles, 12, dtype=torch.float64) * scale
    log_weights[:, 0] = torch.distributions.StudentT(1.5).sample((num_particles,)).abs().log()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, reference = arviz_module().psislw(log_weights.T.contiguous().numpy())
    np.testing.assert_allclose(pareto_khat(log_weights).numpy(), reference, rtol=0, atol=1e-10)


def test_khat_fed_in_chunks_keeps_only_the_tail_and_equals_the_whole():
    torch.manual_seed(0)
    log_weights = torch.randn(4000, 7, dtype=torch.float64) * 3
    tail = ParetoTail(4000)
    for chunk in log_weights.split(333):
        tail.update(chunk)
        assert tail.top.shape[0] <= tail_size(4000) + 1 < 4000 // 10
    np.testing.assert_array_equal(tail.khat().numpy(), pareto_khat(log_weights).numpy())


def test_khat_of_constant_weights_is_minus_infinity_and_short_feeds_are_refused():
    assert pareto_khat(torch.full((30, 3), -2.5)).eq(-float("inf")).all()
    tail = ParetoTail(30)
    tail.update(torch.zeros(10, 2))
    with pytest.raises(Exception, match="fed 10 of its 30 particles"):
        tail.khat()


# --- writers that crash, and long names ------------------------------------------------------


def test_a_writer_that_crashes_its_process_is_one_write_error(tmp_path):
    target = tmp_path / "out.nc"
    with pytest.raises(WriteError, match="the writer died of signal") as info:
        write_in_child(lambda: os.kill(os.getpid(), signal.SIGSEGV), target)
    assert info.value.errno == errno.EIO
    with pytest.raises(WriteError, match="no space left on device"):
        write_in_child(lambda: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")), target)
    write_in_child(lambda: target.write_text("done"), target)
    assert target.read_text() == "done"


def test_a_netcdf_writer_that_segfaults_leaves_the_previous_evaluation(
    run_dir, monkeypatch, capsys
):
    from pyro_vae.evaluate.results import EvaluationResult

    argv = ["evaluate", str(run_dir), "--particles", "30", "--limit", "8", "--quiet"]
    assert main(argv) == 0
    capsys.readouterr()
    before = snapshot(run_dir)

    class Crashing:
        def to_netcdf(self, path):
            Path(path).write_bytes(b"half")
            os.kill(os.getpid(), signal.SIGSEGV)

    monkeypatch.setattr(EvaluationResult, "to_inference_data", lambda self: Crashing())
    assert exit_status(argv) == 2
    assert one_line(capsys).endswith(
        f"cannot write {run_dir / 'eval-test.nc'}: the writer died of signal 11"
    )
    assert snapshot(run_dir) == before


def test_a_valid_long_output_name_is_written(run_dir, tmp_path, capsys):
    output = tmp_path / ("s" * 250 + ".png")
    assert main(["sample", str(run_dir), "--output", str(output), "--num", "4"]) == 0
    assert output.stat().st_size > 0
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


# --- Ctrl-C during start-up ----------------------------------------------------------------


@pytest.mark.parametrize("module", ["torch", "pyro"])
def test_ctrl_c_during_start_up_is_one_line_and_status_130(tmp_path, module):
    import subprocess
    import sys

    out = tmp_path / "run"
    # -X importtime reports each import on stderr as it finishes: the signal is sent once the
    # program is importing (the interpreter's own start-up, before any Python runs, is not
    # the program's), at the first line naming ``module``
    process = subprocess.Popen(
        [sys.executable, "-X", "importtime", "-m", "pyro_vae", "train", *TINY, "--out", str(out)],
        stderr=subprocess.PIPE,
        text=True,
    )
    lines = []
    for line in process.stderr:
        lines.append(line)
        name = line.rsplit("|", 1)[-1].strip()
        if line.startswith("import time:") and (name == module or name.startswith(module + ".")):
            process.send_signal(signal.SIGINT)
            break
    lines.extend(process.stderr)
    process.stderr.close()
    process.wait(timeout=120)
    err = [line for line in lines if not line.startswith("import time:")]
    assert process.returncode == 130, "".join(err)
    assert len(err) == 1 and "interrupted" in err[0], err
    assert not out.exists() or not any(p.name.endswith(".tmp") for p in out.iterdir())
