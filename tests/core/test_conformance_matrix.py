"""The conformance table of ``benchmarks/conformance.py``: every case through every estimator,
against the Pyro ELBO that computes the same quantity on the same random numbers."""

import pytest
from benchmark_loader import load_benchmark


@pytest.fixture
def conformance(monkeypatch):
    return load_benchmark("conformance", monkeypatch)


def test_no_cell_is_silently_wrong_or_crashes_and_the_applicable_ones_equal_pyro(conformance):
    table = conformance.matrix()
    bad = {
        (case, name): cell
        for case, row in table.items()
        for name, cell in row.items()
        if cell[0] in ("different", "crash")
    }
    assert not bad, bad
    equal, applicable, rate = conformance.acceptance(table)
    assert applicable >= 100 and rate >= 0.9, (equal, applicable)
    for case, row in table.items():
        for name, (_outcome, line) in row.items():
            assert "\n" not in line, (case, name)  # refusals are one line


def test_a_cell_that_differs_from_pyro_is_reported_as_different(conformance, monkeypatch):
    """The harness can fail: an estimator whose loss is off by a constant is caught."""
    import pyro_vae.infer

    real = pyro_vae.infer.make_estimator

    class Shifted:
        def __init__(self, estimator):
            self.estimator = estimator

        def differentiable_loss(self, *args, **kwargs):
            return self.estimator.differentiable_loss(*args, **kwargs) + 0.01

    monkeypatch.setattr(conformance, "make_estimator", lambda *a, **k: Shifted(real(*a, **k)))
    case = next(case for case in conformance.CASES if case.name == "plate_local")
    assert conformance.cell(case, "trace")[0] == "different"


def test_the_command_prints_the_table_and_the_rate(conformance, capsys, tmp_path):
    conformance.CASES[:] = conformance.CASES[:3]
    assert conformance.main(["--out", str(tmp_path / "table.json")]) == 0
    out = capsys.readouterr().out
    assert "plate_local" in out and "accepted and equal to Pyro: 15 of 15" in out
    assert (tmp_path / "table.json").exists()
