"""The VampPrior family: its mixture density against torch's MixtureSameFamily, its prior
against the guide at the pseudo-inputs, its sampler's moments, training with every estimator,
and the command line."""

import json
import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_vae import fit
from pyro_vae.app.cli import main
from pyro_vae.evaluate import evaluate
from pyro_vae.models.vampprior import PseudoInputMixture, VampPriorVAE
from pyro_vae.util.errors import ConfigError


def _reference(loc, scale):
    return dist.MixtureSameFamily(
        dist.Categorical(logits=torch.zeros(loc.shape[0])), dist.Normal(loc, scale).to_event(1)
    )


@pytest.mark.parametrize("smallest_scale", [1.0, 0.01])
def test_the_mixture_density_equals_torchs_mixture_under_particle_dimensions(smallest_scale):
    g = torch.Generator().manual_seed(0)
    loc = 3 * torch.randn(7, 4, generator=g)
    scale = smallest_scale + torch.rand(7, 4, generator=g)
    z = loc[torch.randint(7, (5, 6), generator=g)] + 2 * torch.randn(5, 6, 4, generator=g)
    ours = PseudoInputMixture(loc, scale).expand([6]).log_prob(z)
    assert ours.shape == (5, 6)
    torch.testing.assert_close(ours, _reference(loc, scale).log_prob(z), rtol=1e-6, atol=1e-4)


def test_the_mixture_samples_have_the_mixtures_mean_and_variance():
    loc, scale = torch.tensor([[-2.0, 0.0], [3.0, 1.0]]), torch.tensor([[0.5, 1.0], [1.0, 2.0]])
    torch.manual_seed(0)
    draws = PseudoInputMixture(loc, scale).expand([1000]).sample((200,)).reshape(-1, 2)
    mean = loc.mean(0)
    variance = (scale.pow(2) + loc.pow(2)).mean(0) - mean.pow(2)
    n = draws.shape[0]
    assert ((draws.mean(0) - mean).abs() < 4 * (variance / n).sqrt()).all()
    torch.testing.assert_close(draws.var(0), variance, rtol=0.02, atol=0)


def test_the_prior_is_the_mean_of_the_guide_at_the_pseudo_inputs():
    torch.manual_seed(0)
    pair = VampPriorVAE(10, latent_dim=3, hidden=(8,), pseudo_inputs=5)
    x = torch.bernoulli(torch.full((4, 10), 0.3))
    trace = pyro.poutine.trace(pair.model).get_trace(x)
    z = trace.nodes["z"]["value"]
    pseudo = pair.pseudo_inputs()
    assert pseudo.min() >= 0 and pseudo.max() <= 1  # clamped into the pixels' range
    per_input = torch.stack(
        [
            pyro.poutine.trace(pyro.poutine.condition(pair.guide, data={"z": z}))
            .get_trace(u.expand(4, 10))
            .nodes["z"]["fn"]
            .log_prob(z)
            for u in pseudo
        ]
    )  # [M, N]: log q(z | u_m)
    expected = torch.logsumexp(per_input, 0) - math.log(5)
    torch.testing.assert_close(trace.nodes["z"]["fn"].log_prob(z), expected, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize(
    "elbo, k", [("meanfield", 1), ("trace", 1), ("iwae", 3), ("stl", 1), ("dreg", 3)]
)
def test_every_estimator_trains_the_pseudo_inputs_and_the_evaluator_scores_it(elbo, k):
    torch.manual_seed(0)
    x = torch.bernoulli(torch.rand(64, 12))
    pair = VampPriorVAE(12, latent_dim=2, hidden=(16,), pseudo_inputs=4)
    before = pair.pseudo_inputs.raw.detach().clone()
    fit(
        pair,
        x,
        epochs=2,
        batch_size=32,
        elbo=elbo,
        importance_samples=k,
        progress=False,
        final_particles=0,
        seed=0,
    )
    assert not torch.equal(pair.pseudo_inputs.raw, before)  # the prior learns
    result = evaluate(pair.model, pair.guide, x, num_particles=50)
    assert torch.isfinite(result.log_px).all() and (result.gap > -1e-4).all()


def test_a_vampprior_with_one_pseudo_input_at_a_standard_normal_encoding_is_the_vae():
    """M = 1 and an encoder that maps every input to N(0, I): the prior is N(0, I), and the
    model's log-density is the plain VAE's."""
    from pyro_vae.models.vae import VAE

    torch.manual_seed(0)
    vamp = VampPriorVAE(6, latent_dim=2, hidden=(4,), pseudo_inputs=1, scale_fn="exp")
    plain = VAE(6, latent_dim=2, hidden=(4,), scale_fn="exp")
    plain.load_state_dict(
        {k: v for k, v in vamp.state_dict().items() if not k.startswith("pseudo_inputs")}
    )
    with torch.no_grad():  # the encoder's last layer outputs loc 0, log-scale 0 for any input
        last = [m for m in vamp.encoder.modules() if isinstance(m, torch.nn.Linear)][-1]
        last.weight.zero_()
        last.bias.zero_()
        plain.load_state_dict(
            {k: v for k, v in vamp.state_dict().items() if not k.startswith("pseudo_inputs")}
        )
    x = torch.bernoulli(torch.full((5, 6), 0.5))
    z = torch.randn(5, 2)
    traces = [
        pyro.poutine.trace(pyro.poutine.condition(p.model, data={"z": z})).get_trace(x)
        for p in (vamp, plain)
    ]
    for trace in traces:
        trace.compute_log_prob()
    torch.testing.assert_close(traces[0].nodes["z"]["log_prob"], traces[1].nodes["z"]["log_prob"])
    torch.testing.assert_close(traces[0].log_prob_sum(), traces[1].log_prob_sum())


def test_the_command_line_trains_resumes_and_evaluates_the_family(tmp_path, capsys):
    common = [
        "--model",
        "vampprior",
        "--pseudo-inputs",
        "6",
        "--latent-dim",
        "2",
        "--hidden",
        "16",
        "--quiet",
    ]
    assert main(["train", *common, "--epochs", "2", "--out", str(tmp_path / "full")]) == 0
    assert main(["train", *common, "--epochs", "1", "--out", str(tmp_path / "part")]) == 0
    assert main(["train", "--resume", str(tmp_path / "part"), "--epochs", "2", "--quiet"]) == 0
    from pyro_vae.runs import load_run

    full = load_run(tmp_path / "full", device="cpu").model.state_dict()
    part = load_run(tmp_path / "part", device="cpu").model.state_dict()
    assert full.keys() == part.keys() and "pseudo_inputs.raw" in full
    for key in full:  # the resumed run is the uninterrupted one
        torch.testing.assert_close(full[key], part[key], rtol=0, atol=0)
    config = json.loads((tmp_path / "part" / "config.json").read_text())
    assert config["model"]["family"] == "vampprior" and config["model"]["pseudo_inputs"] == 6
    assert main(["evaluate", str(tmp_path / "part"), "--particles", "5", "--quiet"]) == 0
    assert "K = 5 particles" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--pseudo-inputs", "5"],
            "--pseudo-inputs sizes the VampPrior: it needs --model vampprior",
        ),
        (["--model", "vampprior", "--guide", "full"], "use --guide diagonal"),
        (["--model", "vampprior", "--pseudo-inputs", "1000000000"], "memory"),
    ],
)
def test_bad_vampprior_options_get_one_line(tmp_path, capsys, argv, message):
    out = tmp_path / "run"
    assert main(["train", *argv, "--epochs", "1", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and not out.exists()


def test_a_mismatched_mixture_is_refused():
    with pytest.raises(ConfigError, match="one shape"):
        PseudoInputMixture(torch.zeros(3, 2), torch.ones(3, 4))
