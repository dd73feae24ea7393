"""benchmarks/bench_step.py beyond its default run (tests/infer/test_performance_paths.py): the
NumPyro contender's skip, the peers' rows of users' pairs, the memory probe in a child, and the
iwae rows (``--elbos iwae``) with their hand-written bound."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch
from benchmark_loader import load_benchmark

TINY = ["--threads", "1", "--rounds", "1", "--block-seconds", "0.001", "--warmup-steps", "1"]


@pytest.fixture
def bench(monkeypatch):
    load_benchmark("harness", monkeypatch)
    return load_benchmark("bench_step", monkeypatch)


@pytest.mark.skipif(importlib.util.find_spec("numpyro") is not None, reason="numpyro installed")
def test_numpyro_without_numpyro_is_skipped_with_one_message(bench, tmp_path, capsys):
    out = tmp_path / "s.json"
    argv = [*TINY, "--contenders", "torch", "numpyro", "--batch-sizes", "4", "--out", str(out)]
    assert bench.main([*argv, "--elbos", "trace", "--no-check"]) == 0
    err = capsys.readouterr().err
    assert err.count(bench.NUMPYRO_SKIPPED) == 1
    report = json.loads(out.read_text())
    assert [t["implementation"] for t in report["timings"]] == ["torch"]
    assert report["rows"][0]["ms"].keys() == {"hand"}


def test_a_users_pair_row_times_only_what_the_pair_has(bench, tmp_path):
    """--preset peers, row 6 (masked sequences): no VAE, so only the traced step and stock
    Pyro of the contenders asked for; each peers' ms is the wall median of its rounds."""
    out = tmp_path / "p.json"
    argv = [*TINY, "--preset", "peers", "--rows", "6", "--contenders", "torch", "traced", "pyro"]
    assert bench.main([*argv, "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    (row,) = report["rows"]
    assert (row["net"], row["batch"], row["elbo"]) == ("sequences T=20, 20-64-4", 32, "trace")
    assert row["ms"].keys() == {"eager_traced", "stock_pyro"}
    wall = {t["implementation"]: t["rounds_ms"] for t in report["timings"]}
    assert row["ms"]["eager_traced"] == pytest.approx(wall["traced"][0])
    assert {"rows", "machine", "threads", "torch", "command", "load"} <= set(report)


def test_the_memory_mode_probes_both_paths_of_each_row(bench, tmp_path, capsys, monkeypatch):
    """--memory: a probe per path and VAE row, run here as on CUDA (a child on the CPU is the
    same function in a fresh process), each with the network's parameter bytes."""
    monkeypatch.setattr(bench.peak_memory, "probe", lambda script, spec, device, here: here(spec))
    out = tmp_path / "m.json"
    argv = ["--memory", "--memory-steps", "1", "--batch-sizes", "8", "--elbos", "meanfield"]
    assert bench.main([*argv, "--threads", "1", "--out", str(out)]) == 0
    probes = json.loads(out.read_text())["memory"]["training"]
    assert [p["path"] for p in probes] == ["fused", "traced"]
    vae = bench.build_vae("64-128-8", 0, torch.device("cpu"))
    params = sum(p.numel() * p.element_size() for p in vae.parameters())
    for probe in probes:
        assert (probe["batch"], probe["steps"], probe["parameter_bytes"]) == (8, 1, params)
        assert probe["peak_bytes"] >= 0 and probe["method"].startswith("VmHWM")
    assert "memory: 1 training steps, fused path" in capsys.readouterr().out


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_the_peak_covers_a_tensor_that_was_freed(bench):
    """A 64 MiB tensor made and freed inside the work shows in its peak (to a few pages the
    allocator may already hold), and work that allocates nothing shows almost none."""
    size, cpu = 64 * bench.peak_memory.MIB, torch.device("cpu")
    peak, method = bench.peak_memory.peak_bytes(lambda: torch.ones(size // 4), cpu)
    idle, _ = bench.peak_memory.peak_bytes(lambda: None, cpu)
    assert peak >= 0.9 * size and idle < 0.1 * size and method.startswith("VmHWM")


def test_a_probe_runs_its_script_in_a_child_and_reads_its_line(bench, tmp_path):
    """The child gets the spec as ``--memory-probe JSON`` and glibc's fixed mmap threshold; a
    child that fails gives its last line, not a traceback."""
    script = tmp_path / "probe.py"
    script.write_text(
        "import json, os, sys\n"
        "spec = json.loads(sys.argv[2])\n"
        "if spec.get('fail'):\n"
        "    sys.exit('boom: ' + spec['fail'])\n"
        "print('noise')\n"
        "print('PROBE ' + json.dumps({**spec, 'mmap': os.environ['MALLOC_MMAP_THRESHOLD_']}))\n"
    )
    probe, cpu = bench.peak_memory.probe, torch.device("cpu")
    got = probe(script, {"k": 3}, cpu, here=None)
    assert got == {"k": 3, "mmap": str(bench.peak_memory.MMAP_THRESHOLD)}
    with pytest.raises(bench.peak_memory.ProbeError, match="probe.py failed: boom: no data"):
        probe(script, {"fail": "no data"}, cpu, here=None)


def test_bad_rows_and_networks_are_usage_errors(bench, capsys):
    for argv, message in (
        (["--preset", "peers", "--rows", "7"], "--rows: the rows are 0-6"),
        (["--nets", "64-x"], "expected a network D-H-L"),
        (["--nets", "784-400-20"], "digits images have 64 pixels"),
    ):
        with pytest.raises(SystemExit) as exit_:
            bench.parse_args(argv)
        assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_an_iwae_row_checks_fused_against_traced_and_times_the_hand_written_bound(
    bench, tmp_path, capsys
):
    """--elbos iwae: the fused loss equals the traced one bit for bit and the hand-written
    K-sample bound equals it to rounding (the check before timing); only the contenders an
    importance-weighted bound has are timed (stock Pyro has no per-datapoint IWAE loss)."""
    out = tmp_path / "i.json"
    argv = [*TINY, "--elbos", "iwae", "--importance-samples", "3", "--batch-sizes", "4"]
    argv += ["--activation", "tanh", "--contenders", "torch", "fused", "traced", "pyro"]
    assert bench.main([*argv, "--out", str(out)]) == 0
    assert "K=3 iwae" in capsys.readouterr().err
    report = json.loads(out.read_text())
    assert [t["implementation"] for t in report["timings"]] == ["torch", "fused", "traced"]
    assert report["summary"][0]["net"] == "64-128-8 K=3"


def test_the_hand_written_iwae_is_the_k_sample_bound_of_the_same_draws(bench):
    """:func:`torch_iwae_loss` at K = 1 is the hand-written ``trace`` loss of the same draw,
    and at K > 1 it lies below it on average (a bound that tightens with K: Jensen)."""
    vae = bench.build_vae("64-32-4", 0, torch.device("cpu"), activation="tanh")
    x = bench.make_data("random", 64, 6, 0)
    torch.manual_seed(3)
    one = bench.torch_iwae_loss(vae, x, 1)
    torch.manual_seed(3)
    torch.testing.assert_close(one, bench.torch_loss(vae, x, "trace"), rtol=1e-6, atol=1e-5)
    with torch.no_grad():
        torch.manual_seed(4)
        single = torch.stack([bench.torch_iwae_loss(vae, x, 1) for _ in range(200)]).mean()
        torch.manual_seed(4)
        many = torch.stack([bench.torch_iwae_loss(vae, x, 20) for _ in range(200)]).mean()
    assert many < single
