"""The held-out estimate during training: before the first epoch and every N epochs, on a fork
of the random state (training draws what it draws without it), with common random numbers
(the last epoch's estimate is the final estimate's numbers), resumed bit for bit; its rate and
distortion add up to −ELBO; bad settings are one line."""

import copy
import json

import pytest
import torch

from pyro_vae import fit
from pyro_vae.app.cli import main
from pyro_vae.runs.config import TrainConfig
from pyro_vae.util.errors import CheckpointError, ConfigError

SMALL = dict(batch_size=256, final_particles=30, progress=False)


def _config(**changes):
    from pyro_vae.models.config import ModelConfig

    return TrainConfig(model=ModelConfig(latent_dim=2, hidden=(16,)), **changes)


def _estimates(run_dir):
    return json.loads((run_dir / "history.json").read_text())


def test_estimates_come_before_training_and_every_n_epochs_without_changing_the_training(
    tmp_path,
):
    with_estimates = fit(
        config=_config(epochs=4, estimate_every=2), run_dir=tmp_path / "a", **SMALL
    )
    without = fit(config=_config(epochs=4), run_dir=tmp_path / "b", **SMALL)
    history = with_estimates.history
    assert [e["epoch"] for e in history.extra["estimates"]] == [0, 2, 4]
    assert history.train_loss == without.history.train_loss  # bit for bit
    assert history.test_elbo == without.history.test_elbo
    for a, b in zip(with_estimates.model.parameters(), without.model.parameters()):
        assert torch.equal(a, b)
    # the same seed for every estimate and for the final one: the last epoch's numbers are its
    last, final = history.extra["estimates"][-1], history.extra["final"]
    assert last["log_px"] == final["test_log_px"]
    assert last["log_px_stderr"] == final["test_log_px_stderr"]
    assert last["elbo"] == final["test_elbo"]
    # and training improves the held-out bound from the initial weights
    first = history.extra["estimates"][0]
    assert last["log_px"] > first["log_px"] + 3 * first["log_px_stderr"]
    assert "estimates" not in without.history.extra


def test_an_estimates_numbers_hang_together(tmp_path):
    result = fit(config=_config(epochs=2, estimate_every=1), run_dir=tmp_path / "run", **SMALL)
    for entry in result.history.extra["estimates"]:
        assert entry["particles"] == 30
        assert entry["gap"] == pytest.approx(entry["log_px"] - entry["elbo"])
        assert entry["gap"] >= 0  # log of a mean of weights >= the mean of their logs
        assert 1 / 30 <= entry["ess"] <= 1
        assert 0 <= entry["khat_bad"] <= 1
        assert entry["rate"] >= 0  # a KL, in closed form for the built-in VAE
        # R + D is −ELBO, from other draws: within a small part of the spread over datapoints
        assert (
            abs(entry["rate"] + entry["distortion"] + entry["elbo"])
            < entry["distortion_stderr"] / 4
        )
    saved = _estimates(tmp_path / "run")["estimates"]
    assert saved == result.history.extra["estimates"]


def test_a_resumed_run_estimates_what_an_uninterrupted_one_does(tmp_path):
    whole = fit(config=_config(epochs=4, estimate_every=1), run_dir=tmp_path / "whole", **SMALL)
    fit(config=_config(epochs=2, estimate_every=1), run_dir=tmp_path / "parts", **SMALL)
    resumed = fit(
        config=_config(epochs=4, estimate_every=1), run_dir=tmp_path / "parts", resume=True, **SMALL
    )
    assert resumed.history.extra["estimates"] == whole.history.extra["estimates"]


def test_below_k_21_there_is_no_k_hat(tmp_path):
    result = fit(
        config=_config(epochs=1, estimate_every=1),
        run_dir=tmp_path / "run",
        **{**SMALL, "final_particles": 5},
    )
    entry = result.history.extra["estimates"][-1]
    assert "khat_max" not in entry and "khat_bad" not in entry
    assert entry["particles"] == 5


def test_bad_settings_are_one_line(tmp_path, capsys):
    from tests.support.linear_gaussian import LinearGaussian

    pair = LinearGaussian.random(data_dim=5, latent_dim=2)
    with pytest.raises(ConfigError, match="estimate_every=1 estimates log p.* give test_data"):
        fit(pair, pair.sample(40), estimate_every=1, epochs=1, progress=False)
    with pytest.raises(ConfigError, match=r"estimate_every must be >= 1 \(or None\), got 0"):
        TrainConfig(estimate_every=0)
    with pytest.raises(ConfigError, match="it needs final_particles >= 1"):
        TrainConfig(estimate_every=2, final_particles=0)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--estimate-every", "0", "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "pyro-vae train: error: argument --estimate-every: expected a number >= 1, got 0 "
        "(see pyro-vae train --help)"
    ]
    assert not (tmp_path / "x").exists()


def test_a_damaged_estimate_in_the_history_is_refused_on_resume(tmp_path):
    run = tmp_path / "run"
    fit(config=_config(epochs=1, estimate_every=1), run_dir=run, **SMALL)
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=True)
    checkpoint["history"]["estimates"] = [{"log_px": -1.0}]
    torch.save(checkpoint, run / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="history.estimates"):
        fit(config=_config(epochs=2, estimate_every=1), run_dir=run, resume=True, **SMALL)


def test_with_the_exact_posterior_as_guide_the_estimate_is_the_closed_form(tmp_path):
    from torch.distributions import MultivariateNormal, kl_divergence

    from tests.support.linear_gaussian import LinearGaussian

    torch.manual_seed(0)
    pair = LinearGaussian.random(data_dim=5, latent_dim=2)  # the full guide: q(z|x) = p(z|x)
    train, test = pair.sample(200), pair.sample(100)
    initial = copy.deepcopy(pair)  # training moves the guide's shift and scale off the posterior
    result = fit(
        pair,
        train,
        test_data=test,
        epochs=1,
        estimate_every=1,
        run_dir=tmp_path / "run",
        **SMALL,
    )
    entry = result.history.extra["estimates"][0]  # before training: the initial parameters
    with torch.no_grad():
        log_px = initial.log_marginal(test)
        prior = MultivariateNormal(torch.zeros(2, dtype=test.dtype), torch.eye(2, dtype=test.dtype))
        rate = kl_divergence(initial.posterior(test), prior)
    assert entry["log_px"] == pytest.approx(log_px.mean().item(), abs=1e-4)
    assert entry["gap"] == pytest.approx(0.0, abs=1e-4)  # every weight is p(x)
    assert entry["ess"] == pytest.approx(1.0, abs=1e-4)
    assert entry["rate"] == pytest.approx(rate.mean().item(), rel=1e-6)  # closed form


def test_a_guide_site_summed_out_has_its_elbo_beside_the_summed_bound(tmp_path):
    """The guide enumerates the class y of a Gaussian mixture: log p̂_K is then exact for every
    K (one discrete latent summed out: every weight is p(x)), the evaluator's ELBO is the summed
    bound (the same), and −(R + D), with y drawn, is Pyro's TraceEnum_ELBO; the k-hat of equal
    weights is not finite and is recorded as null (strict JSON)."""
    from tests.support.mixtures import GaussianMixture, mixture_data

    torch.manual_seed(0)
    pair, x = GaussianMixture(), torch.as_tensor(mixture_data())
    result = fit(
        pair, x, test_data=x, epochs=1, estimate_every=1, run_dir=tmp_path / "run", **SMALL
    )
    entry = result.history.extra["estimates"][-1]
    with torch.no_grad():
        assert entry["log_px"] == pytest.approx(
            pair.exact_log_likelihood(x).mean().item(), abs=1e-5
        )
    assert entry["gap"] == pytest.approx(0.0, abs=1e-6) and entry["khat_max"] is None
    assert entry["trace_enum_elbo"] < entry["log_px"]
    difference = entry["rate"] + entry["distortion"] + entry["trace_enum_elbo"]
    assert abs(difference) < entry["distortion_stderr"] / 2, difference
    text = (tmp_path / "run" / "history.json").read_text()
    json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in history.json"))
