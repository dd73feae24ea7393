"""Pyro's examples (``benchmarks/pyro_examples.py``) trained by fit and by Pyro's SVI from the
same seed reach the same numbers."""

import math

import pytest
from benchmark_loader import load_benchmark


@pytest.fixture
def examples(monkeypatch):
    return load_benchmark("pyro_examples", monkeypatch)


def _example(examples, name):
    return next(e for e in examples.EXAMPLES if e.name == name)


@pytest.mark.parametrize("name", ["mixture", "hmm"])
def test_enumerated_examples_with_point_mass_guides_reach_pyros_svi_numbers(examples, name):
    """Every latent either enumerated (summed exactly) or a point mass: fit with ``trace`` and
    SVI with TraceEnum_ELBO follow the same deterministic objective, so both trained pairs have
    the same ELBO, which the evaluator reproduces."""
    result = examples.run(_example(examples, name), steps=30, seed=0, draws=3)
    ours, theirs = result["pyro_vae_fit"], result["pyro_svi"]
    assert ours["pyro_elbo"] == pytest.approx(theirs["pyro_elbo"], abs=1e-2)
    assert ours["evaluator_elbo"] == pytest.approx(ours["pyro_elbo"], abs=1e-3)


def test_the_sparse_gamma_def_trains_under_fit_and_svi_to_finite_elbos(examples):
    result = examples.run(_example(examples, "sparse_gamma_def"), steps=20, seed=0, draws=20)
    assert all(
        math.isfinite(scores["pyro_elbo"]) for name, scores in result.items() if name != "initial"
    )


@pytest.mark.parametrize(
    "name", ["vae", "ss_vae_M2", "ss_vae_M2_labelled", "cvae", "dmm", "lda", "prodlda", "scanvi"]
)
def test_network_examples_learn_under_fit_as_under_pyros_svi(examples, name):
    """From the same initial networks, for the same steps: fit's pair gains at least half the
    ELBO that Pyro's SVI gains (its own networks' weights are trained, nothing is left
    unused), and the evaluator's ELBO of each trained pair is Pyro's loss within 2 % (with the
    class enumerated in the guide: TraceEnum_ELBO's, not the summed bound above it)."""
    example = _example(examples, name)
    result = examples.run(example, steps=25, seed=0, draws=8)
    start, ours, theirs = result["initial"], result["pyro_vae_fit"], result["pyro_svi"]
    assert theirs["pyro_elbo"] > start and ours["pyro_elbo"] - start > 0.5 * (
        theirs["pyro_elbo"] - start
    ), (start, ours, theirs)
    if name not in ("prodlda", "lda"):  # dropout in Pyro's loss; Dirichlet globals: noisy
        for scores in (ours, theirs):
            assert scores["evaluator_elbo"] == pytest.approx(scores["pyro_elbo"], rel=0.02)


@pytest.mark.parametrize("name", ["vae", "ss_vae_M2", "prodlda"])
def test_every_estimator_trains_an_example_or_refuses_it_in_one_line(examples, name):
    cells = examples.estimators(_example(examples, name), steps=1, seed=0)
    assert set(cells) == set(examples.ESTIMATORS)
    assert all(
        line.startswith(("ran", "refused")) and "\n" not in line for line in cells.values()
    ), cells
    assert cells["trace"].startswith("ran") and cells["meanfield"].startswith("ran")
    if name == "prodlda":  # dropout: the estimators that replay the guide say so
        assert cells["stl"].startswith("refused") and "dropout" in cells["stl"]


def test_the_air_example_trains_its_sampled_presence_variables_with_trace_and_vimco(examples):
    example = _example(examples, "air")
    result = examples.run(example, steps=15, seed=0, draws=4)
    start, ours = result["initial"], result["pyro_vae_fit"]
    assert ours["pyro_elbo"] > start
    cells = examples.estimators(example, steps=1, seed=0)
    assert cells["trace"].startswith("ran") and cells["vimco"].startswith("ran")
    assert all(
        cells[name].startswith(
            "refused: guide site 'z_pres_0' (Bernoulli) is not reparameterizable"
        )
        for name in ("iwae", "stl", "dreg")
    )


def test_ais_scores_the_vae_example_and_refuses_prodlda_in_one_line(examples):
    vae = examples.run(_example(examples, "vae"), steps=10, seed=0, draws=4, ais_steps=20, chains=4)
    assert vae["ais"].startswith("log p̂")
    assert float(vae["ais"].split()[-1]) > vae["pyro_vae_fit"]["evaluator_elbo"]
    prodlda = examples.run(
        _example(examples, "prodlda"), steps=2, seed=0, draws=2, ais_steps=5, chains=2
    )
    assert prodlda["ais"].startswith("refused: AIS") and "evaluator" in prodlda["ais"]


def test_the_compiled_comparison_reports_both_losses_or_a_refusal_in_one_line(examples):
    """Without a compiler the line is the refusal or the eager fallback, never a crash."""
    line = examples.compiled(_example(examples, "mixture"), steps=1, seed=0)
    assert "\n" not in line and not line.startswith("crash"), line


def test_the_command_prints_one_row_per_example_seed_and_trainer(examples, capsys, tmp_path):
    assert (
        examples.main(
            [
                "--steps",
                "2",
                "--seeds",
                "0",
                "--draws",
                "2",
                "--examples",
                "mixture",
                "--estimator-steps",
                "0",
                "--ais-steps",
                "0",
                "--out",
                str(tmp_path / "out.json"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.count("mixture") == 2 and "pyro_svi" in out and "pyro_vae_fit" in out
