"""Pyro's examples (``benchmarks/pyro_examples.py``) trained by fit and by Pyro's SVI from the
same seed reach the same numbers."""

import math

import pytest

from benchmark_loader import load_benchmark


@pytest.fixture
def examples(monkeypatch):
    return load_benchmark("pyro_examples", monkeypatch)


@pytest.mark.parametrize("name", ["mixture", "hmm"])
def test_enumerated_examples_with_point_mass_guides_reach_pyros_svi_numbers(examples, name):
    """Every latent either enumerated (summed exactly) or a point mass: fit with ``trace`` and
    SVI with TraceEnum_ELBO follow the same deterministic objective, so both trained pairs have
    the same ELBO, which the evaluator reproduces."""
    example = next(e for e in examples.EXAMPLES if e.name == name)
    result = examples.run(example, steps=30, seed=0, draws=3)
    ours, theirs = result["pyro_vae_fit"], result["pyro_svi"]
    assert ours["pyro_elbo"] == pytest.approx(theirs["pyro_elbo"], abs=1e-2)
    assert ours["evaluator_elbo"] == pytest.approx(ours["pyro_elbo"], abs=1e-3)


def test_the_sparse_gamma_def_trains_under_fit_and_svi_to_finite_elbos(examples):
    example = next(e for e in examples.EXAMPLES if e.name == "sparse_gamma_def")
    result = examples.run(example, steps=20, seed=0, draws=20)
    assert all(math.isfinite(scores["pyro_elbo"]) for scores in result.values())


def test_the_command_prints_one_row_per_example_seed_and_trainer(examples, capsys, tmp_path):
    assert examples.main(["--steps", "2", "--seeds", "0", "--draws", "2", "--examples",
                          "mixture", "--out", str(tmp_path / "out.json")]) == 0
    out = capsys.readouterr().out
    assert out.count("mixture") == 2 and "pyro_svi" in out and "pyro_vae_fit" in out
