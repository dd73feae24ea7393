"""The timing harness of benchmarks/: interleaving, paired ratios, load warnings, atomic JSON,
the shared options. Every clock here is a fake: nothing about real durations is asserted."""

from __future__ import annotations

import io
import json
import statistics
import sys

import pytest
from benchmark_loader import load_benchmark


@pytest.fixture
def harness(monkeypatch):
    return load_benchmark("harness", monkeypatch)


class FakeClock:
    """A clock that only the contenders advance: each adds its own cost."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _contenders(clock: FakeClock, calls: list[str], costs: dict[str, float]):
    def make(name):
        def run():
            calls.append(name)
            clock.now += costs[name]

        return run

    return {name: make(name) for name in costs}


def test_rounds_rotate_and_times_come_from_the_clock(harness):
    clock, calls = FakeClock(), []
    costs = {"a": 2.0, "b": 3.0, "c": 8.0}
    timings = harness.interleave(
        _contenders(clock, calls, costs),
        rounds=4,
        warmup=1,
        calls=2,
        clocks=harness.Clocks(cpu=clock, wall=clock),
    )
    assert calls[:3] == ["a", "b", "c"]  # warm-up, untimed
    assert timings.orders == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    timed = calls[3:]
    assert timed == [name for order in timings.orders for name in order for _ in range(2)]
    for name, cost in costs.items():
        assert timings.cpu[name] == [cost] * 4  # per call: the 2 calls' total / 2
        assert timings.wall[name] == [cost] * 4


def test_paired_ratios_are_per_round_and_match_the_times(harness):
    timings = harness.Timings(
        cpu={"base": [1.0, 2.0, 4.0], "new": [3.0, 3.0, 2.0]},
        wall={"base": [1.0, 1.0, 1.0], "new": [2.0, 2.0, 2.0]},
        orders=[["base", "new"]] * 3,
    )
    ratio = harness.ratios(timings, "base")["new"]
    assert ratio["cpu"]["per_round"] == [3.0, 1.5, 0.5]
    assert (ratio["cpu"]["median"], ratio["cpu"]["min"], ratio["cpu"]["max"]) == (1.5, 0.5, 3.0)
    assert ratio["wall"]["median"] == 2.0
    assert harness.format_ratio(ratio["cpu"]) == "1.50× (0.50–3.00)"
    with pytest.raises(ValueError, match="baseline 'gone'"):
        harness.ratios(timings, "gone")


def test_the_report_holds_loads_times_and_ratios(harness, tmp_path):
    loads = iter([[0.5, 0.5, 0.5], [2.5, 1.0, 1.0]])
    stream = io.StringIO()
    session = harness.Session(load=lambda: next(loads), stream=stream)
    assert stream.getvalue() == ""
    timings = harness.Timings(
        cpu={"a": [1.0, 3.0], "b": [2.0, 2.0]},
        wall={"a": [1.0, 1.0], "b": [4.0, 4.0]},
        orders=[["a", "b"], ["b", "a"]],
    )
    report = session.report(timings, baseline="a", size=7)
    assert "load average 2.50 at end" in stream.getvalue()
    assert report["load_average"] == {"start": [0.5, 0.5, 0.5], "end": [2.5, 1.0, 1.0]}
    assert report["size"] == 7 and report["rounds"] == 2
    assert report["seconds_per_call"]["cpu"]["a"] == {"median": 2.0, "per_round": [1.0, 3.0]}
    assert report["ratios"]["b"]["cpu"]["per_round"] == [2.0, 2.0 / 3.0]
    out = tmp_path / "r.json"
    harness.write_json(out, report)
    assert json.loads(out.read_text()) == report
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary left


def test_a_failed_write_leaves_the_old_file(harness, tmp_path):
    out = tmp_path / "r.json"
    out.write_text("old\n")
    with pytest.raises(TypeError):
        harness.write_json(out, {"x": object()})
    assert out.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_shared_options_refuse_bad_values(harness, tmp_path, capsys):
    import argparse

    parser = argparse.ArgumentParser(parents=[harness.parent_parser(rounds=3)])
    args = parser.parse_args([])
    assert (args.rounds, args.warmup, args.seed, args.out, args.threads) == (3, 1, 0, None, 1)
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["--rounds", "0"])
    assert exit_.value.code == 2 and "--rounds" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        harness.check_out(parser, tmp_path / "missing" / "r.json")
    assert exit_.value.code == 2 and "does not exist" in capsys.readouterr().err
    with pytest.raises(ValueError, match="rounds"):
        harness.interleave({"a": lambda: None}, rounds=0)
    assert sys.modules["harness"] is harness


def test_param_messages_benchmark_reports_paired_ratios(tmp_path, monkeypatch, capsys):
    """A tiny run of benchmarks/bench_param_messages.py: every registration and workload is
    timed each round, and each ratio is the per-round quotient of the recorded times."""
    load_benchmark("harness", monkeypatch)
    bench = load_benchmark("bench_param_messages", monkeypatch)
    out = tmp_path / "pm.json"
    report = bench.main(
        [
            "--rounds",
            "2",
            "--steps",
            "1",
            "--evaluations",
            "1",
            "--num-data",
            "4",
            "--particles",
            "2",
            "--out",
            str(out),
        ]
    )
    saved = json.loads(out.read_text())
    assert saved["rounds"] == 2 and len(saved["orders"]) == 2
    assert set(saved["orders"][0]) == set(saved["seconds_per_call"]["cpu"])
    cpu = saved["seconds_per_call"]["cpu"]
    for key, row in report.items():
        if "cpu_over_internals" in row:
            base = key.split("/")[0] + "/internals"
            expected = [a / b for a, b in zip(cpu[key]["per_round"], cpu[base]["per_round"])]
            assert row["cpu_over_internals"]["per_round"] == pytest.approx(expected)
            assert saved[key]["cpu_over_internals"]["median"] > 0
    assert "CPU / internals" in capsys.readouterr().out


def test_evaluate_benchmark_ratios_come_from_its_rounds(tmp_path, monkeypatch, capsys):
    """A tiny run of benchmarks/bench_evaluate.py: the paired ratios are the per-round quotients
    of CPU times against each hand-written contender, the best hand-written one is the one of
    least median CPU time, and at the same chunk the package's and the hand-written log p̂ agree
    (the same draws)."""
    load_benchmark("harness", monkeypatch)
    bench = load_benchmark("bench_evaluate", monkeypatch)
    out = tmp_path / "e.json"
    argv = "--threads 1 --rounds 2 --particles 30 --num-data 6 --particle-chunk 10"
    argv += " --hand-chunks 10 4 --batch-size 3 --importance-data 1 --importance-particles 3"
    report = bench.main([*argv.split(), "--min-seconds", "0", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["cpu_ratio_package_over_best_hand"] == report["cpu_ratio_package_over_best_hand"]
    cpu = report["cpu_seconds_all"]
    assert set(cpu) == {"package", "package+khat", "torch@10", "torch@4"}
    median = {name: statistics.median(values) for name, values in cpu.items()}
    assert report["best_hand"] == min(("torch@10", "torch@4"), key=median.get)
    for hand in ("torch@10", "torch@4"):
        ratio = report["cpu_ratio_package_over_each_hand"][hand]
        assert ratio["per_round"] == [a / b for a, b in zip(cpu["package"], cpu[hand])]
        assert ratio["median"] == statistics.median(ratio["per_round"])
    assert report["setup"]["calls_per_measurement"] == dict.fromkeys(cpu, 1)
    assert len(report["page_faults_all"]["torch@10"]) == 2
    means = report["mean_log_px"]  # the same chunk draws the same numbers
    assert means["package"] == pytest.approx(means["torch@10"], abs=1e-4)
    assert "package / torch@10" in capsys.readouterr().out


def test_calibration_and_calls_per_contender(harness):
    clock, calls = FakeClock(), []
    costs = {"fast": 1.0, "slow": 4.0}
    contenders = _contenders(clock, calls, costs)
    counts = {
        name: harness.calibrate(fn, 40.0, minimum=1, clock=clock) for name, fn in contenders.items()
    }
    assert counts == {"fast": 40, "slow": 12}  # calls in 10 fake seconds, times four
    calls.clear()
    timings = harness.interleave(
        contenders, rounds=2, calls=counts, clocks=harness.Clocks(cpu=clock, wall=clock)
    )
    assert calls.count("fast") == 80 and calls.count("slow") == 24
    assert timings.wall == {"fast": [1.0, 1.0], "slow": [4.0, 4.0]}
    with pytest.raises(ValueError, match="calls"):
        harness.interleave(contenders, rounds=1, calls={"fast": 1})


def test_evaluate_benchmark_throughput_from_its_median_rounds(tmp_path, monkeypatch, capsys):
    """benchmarks/bench_evaluate.py --throughput on a tiny digits setup: every contender is
    timed every round, the two at one chunk give the same log p̂ (same draws), and the FLOP
    count and rates follow from the network's sizes and the median CPU times; the GEMM rate is
    the fastest of the decoder's products at each contender's chunk."""
    load_benchmark("harness", monkeypatch)
    bench = load_benchmark("bench_evaluate", monkeypatch)
    argv = "--threads 1 --rounds 2 --num-data 6 --particles 30 --batch-size 3 --particle-chunk 10"
    argv += " --hand-chunks 10 --min-seconds 0"
    report = bench.main(
        [*argv.split(), "--importance-data", "1", "--importance-particles", "3", "--throughput"]
    )
    cpu = report["cpu_seconds_all"]
    assert {len(values) for values in cpu.values()} == {2}
    assert report["agreement_package_minus_best_hand"]["max_abs_difference"] < 1e-3
    section = report["throughput"]
    # digits 64-128-8: decoder 2·(8·128 + 128·64) per particle, encoder 2·(64·128 + 128·16)
    assert section["flops"] == 6 * 30 * 18432 + 6 * 20480
    assert [m["rows"] for m in section["matmul"]["by_rows"]] == [3 * 10]
    gemm = section["matmul"]["flops_per_s"]
    assert gemm == max(m["flops_per_s"] for m in section["matmul"]["by_rows"])
    for name, values in cpu.items():
        rate = section["flops_per_s"][name]
        assert rate == section["flops"] / statistics.median(values)
        assert section["fraction_of_matmul_rate"][name] == rate / gemm
    printed = capsys.readouterr().out
    assert printed.count("round 1/2 ") == 3 and "machine GEMM rate" in printed


def test_evaluate_benchmark_small_k_has_no_khat(monkeypatch):
    """Below the 21 particles PSIS needs, the benchmark times no k-hat contender, and a package
    at its default chunk is compared with every hand-written chunk."""
    load_benchmark("harness", monkeypatch)
    bench = load_benchmark("bench_evaluate", monkeypatch)
    argv = "--threads 1 --rounds 1 --num-data 4 --particles 5 --batch-size 4 --min-seconds 0"
    report = bench.main([*argv.split(), "--importance-data", "1", "--importance-particles", "2"])
    assert set(report["cpu_seconds_all"]) == {"package", "torch@50", "torch@500"}
    assert report["setup"]["particle_chunk"] is None
