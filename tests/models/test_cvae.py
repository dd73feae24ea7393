import json
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from threads import one_thread

from pyro_vae import DataError
from pyro_vae.app.classify import class_log_joint, classify
from pyro_vae.app.cli import main
from pyro_vae.data.images import load_digits
from pyro_vae.evaluate import evaluate
from pyro_vae.infer import make_estimator
from pyro_vae.models.cvae import CVAE
from pyro_vae.models.nets import MIN_SCALE

CLASSES, BLOCK = 3, 4


def separable_data(n_per_class=30, seed=0):
    """Class c lights pixel block c (probability 0.9) and leaves the others dark (0.1)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(CLASSES).repeat_interleave(n_per_class)
    probs = torch.full((labels.shape[0], CLASSES * BLOCK), 0.1)
    for c in range(CLASSES):
        probs[labels == c, c * BLOCK : (c + 1) * BLOCK] = 0.9
    return torch.bernoulli(probs, generator=generator), labels


def fitted_cvae(images, labels, steps=300):
    model = CVAE(images.shape[1], CLASSES, latent_dim=2, hidden=(16,))
    model.set_class_probs(labels)
    elbo = make_estimator("meanfield", num_particles=4, max_plate_nesting=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    with pyro.validation_enabled(False):
        for _ in range(steps):
            optimizer.zero_grad()
            (
                elbo.differentiable_loss(model.model, model.guide, images, labels) / images.shape[0]
            ).backward()
            optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def trained():
    """A CVAE fitted to 300 separable images; one thread, as tensors this small run fastest
    without thread synchronization (the machine may be shared)."""
    with one_thread():
        pyro.set_rng_seed(0)
        images, labels = separable_data(n_per_class=100)
        return fitted_cvae(images, labels), images, labels


def bayes_accuracy() -> float:
    """The accuracy of the Bayes classifier on :func:`separable_data`, exactly: Σ_x max_c
    π_c p(x | c) over all 2^(C·BLOCK) images."""
    images = torch.cartesian_prod(*[torch.tensor([0.0, 1.0])] * (CLASSES * BLOCK))
    probs = torch.full((CLASSES, CLASSES * BLOCK), 0.1, dtype=torch.float64)
    for c in range(CLASSES):
        probs[c, c * BLOCK : (c + 1) * BLOCK] = 0.9
    log_lik = dist.Bernoulli(probs).log_prob(images[:, None, :].double()).sum(-1)
    return (log_lik.exp().max(1).values.sum() / CLASSES).item()


def test_generative_classifier_separates_separable_classes(trained):
    """Near-perfect classes (the Bayes classifier is right 99.5 % of the time): the CVAE's
    accuracy on 300 new images is within 3 binomial standard errors of the Bayes accuracy."""
    model, _, _ = trained
    test_images, test_labels = separable_data(n_per_class=100, seed=1)
    n = test_labels.shape[0]
    result = classify(model, test_images, test_labels, num_particles=50)
    best = bayes_accuracy()
    assert result.accuracy >= best - 3 * (best * (1 - best) / n) ** 0.5
    assert torch.allclose(result.posterior.sum(1), torch.ones(n, dtype=result.posterior.dtype))
    matrix = result.confusion_matrix()
    assert matrix.sum() == n and matrix.trace() == (result.predicted == test_labels).sum()


def test_classifier_is_exact_when_the_guide_is_the_prior_and_z_is_unused():
    """With a decoder that ignores z and a guide equal to the prior N(0, I), every importance
    weight is p(x | c) exactly, so log p̂_K(x, c) = log p(x | c) + log π_c for any K; the
    posterior, the marginal log p(x) = logsumexp_c and the predictions are then the exact ones
    (tolerance: float64 rounding). This pins the alignment of images and labels in the
    label-vectorized computation."""
    torch.manual_seed(0)
    model = CVAE(
        CLASSES * BLOCK,
        CLASSES,
        latent_dim=2,
        hidden=(8,),
        class_probs=torch.tensor([0.5, 0.3, 0.2]),
    ).double()
    head = model.encoder.net.head
    with torch.no_grad():
        model.decoder.net.net[0].weight[:, :2] = 0.0  # the z columns of the first layer
        head.weight.zero_()
        head.bias.zero_()
        head.bias[2:] = math.log(math.expm1(1.0 - MIN_SCALE))  # unit scales
    images, labels = separable_data(n_per_class=4, seed=2)
    images = images.double()
    torch.testing.assert_close(model.encoder(images, labels)[1], torch.ones(12, 2).double())
    classes = torch.arange(CLASSES)
    out = model.decoder(
        torch.zeros(images.shape[0], CLASSES, 2, dtype=torch.float64),
        classes.expand(images.shape[0], CLASSES),
    )
    exact = (
        dist.Bernoulli(logits=out).log_prob(images[:, None, :]).sum(-1) + model.class_probs.log()
    )
    result = classify(model, images, labels, num_particles=7)
    torch.testing.assert_close(result.log_joint, exact)
    torch.testing.assert_close(result.log_marginal, exact.logsumexp(1))
    assert torch.equal(result.predicted, exact.argmax(1))


def test_label_vectorized_scores_match_one_label_at_a_time(trained):
    """Both are importance-weighted estimates of log p(x, c); they agree within Monte Carlo error.

    The tolerance is 5 combined standard errors, with the delta-method standard error of
    log p̂_K = std(w) / (mean(w) √K) computed from the one-label-at-a-time weights.
    """
    model, images, _ = trained
    images = images[::15]
    particles = 2000
    torch.manual_seed(3)
    vectorized = class_log_joint(model, images, num_particles=particles)
    for c in range(CLASSES):
        labels = torch.full((images.shape[0],), c)
        single = evaluate(
            model.model, model.guide, images, labels, num_particles=particles, keep_log_weights=True
        )
        weights = torch.softmax(single.log_weights.double(), dim=0) * particles
        stderr = weights.std(0) / particles**0.5
        assert ((vectorized[:, c] - single.log_px).abs() < 5 * 2**0.5 * stderr + 1e-4).all()


def test_transfer_with_the_true_label_is_the_reconstruction(trained):
    model, images, labels = trained
    grid = model.transfer(images[:5], labels[:5])
    assert grid.shape == (5, CLASSES, images.shape[1])
    own = grid[torch.arange(5), labels[:5]]
    assert torch.allclose(own, model.reconstruct(images[:5], labels[:5]))
    others = grid[torch.arange(5), (labels[:5] + 1) % CLASSES]
    assert not torch.allclose(own, others, atol=1e-2)


def test_conditional_sampling_follows_the_label(trained):
    model, _, _ = trained
    wanted = torch.full((200,), 1)
    images = model.sample(200, labels=wanted, generator=torch.Generator().manual_seed(0))
    blocks = images.reshape(200, CLASSES, BLOCK).mean(-1).mean(0)
    assert blocks.argmax() == 1


def test_unlabelled_generation_draws_labels_from_the_class_prior():
    """``model()`` without labels samples y ~ π: each class's frequency among n draws is within
    4 binomial standard errors of π_c."""
    probs = torch.tensor([0.5, 0.3, 0.2])
    model = CVAE(CLASSES * BLOCK, CLASSES, latent_dim=2, hidden=(8,), class_probs=probs)
    n = 4000
    pyro.set_rng_seed(0)
    trace = poutine.trace(model.model).get_trace(num_data=n)
    assert trace.nodes["x"]["value"].shape == (n, CLASSES * BLOCK)
    frequencies = torch.bincount(trace.nodes["y"]["value"], minlength=CLASSES) / n
    assert ((frequencies - probs).abs() < 4 * (probs * (1 - probs) / n).sqrt()).all()


@pytest.mark.parametrize(
    "labels, message",
    [
        (torch.tensor([0, 1, 3]), "labels must be integers in 0..2"),
        (torch.tensor([0, -1, 2]), "labels must be integers in 0..2"),
        (torch.tensor([0, 1]), "expected 3 labels"),
    ],
)
def test_bad_labels_get_a_clear_message(trained, labels, message):
    model, images, _ = trained
    with pytest.raises(DataError, match=message):
        classify(model, images[:3], labels, num_particles=2)
    with pytest.raises(DataError, match=message):
        model.guide(images[:3], labels)


def test_cli_classify_transfer_and_labelled_samples(tmp_path, capsys):
    run = tmp_path / "cvae"
    assert (
        main(
            [
                "train",
                "--model",
                "cvae",
                "--epochs",
                "1",
                "--batch-size",
                "256",
                "--hidden",
                "16",
                "--latent-dim",
                "2",
                "--quiet",
                "--out",
                str(run),
            ]
        )
        == 0
    )
    assert main(["classify", str(run), "--particles", "3", "--limit", "20"]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "confusion matrix" in out
    report = json.loads((run / "classify-test.json").read_text())
    assert len(report["posterior"]) == 20 and len(report["posterior"][0]) == 10
    log_joint = torch.tensor(report["log_joint"], dtype=torch.float64)
    torch.testing.assert_close(
        torch.tensor(report["log_px"], dtype=torch.float64), log_joint.logsumexp(1)
    )
    torch.testing.assert_close(
        torch.tensor(report["posterior"], dtype=torch.float64), log_joint.softmax(1)
    )
    assert (run / "confusion-test.png").exists()
    assert main(["transfer", str(run), "--num", "3"]) == 0
    assert (run / "transfer.png").exists()
    assert main(["sample", str(run), "--label", "3", "--num", "4"]) == 0
    assert main(["sample", str(run), "--num", "20"]) == 0
    capsys.readouterr()
    for bad in ("12", "-1"):
        assert main(["sample", str(run), "--label", bad]) == 2
        assert "--label must lie in 0..9" in capsys.readouterr().err
    assert main(["transfer", str(run), "--num", "100000"]) == 2
    available = len(load_digits().test)
    assert f"--num 100000 is more than the {available} test images" in capsys.readouterr().err


def test_cli_refuses_cvae_commands_on_a_plain_vae(tmp_path, capsys):
    run = tmp_path / "vae"
    assert (
        main(
            [
                "train",
                "--epochs",
                "1",
                "--batch-size",
                "256",
                "--hidden",
                "16",
                "--latent-dim",
                "2",
                "--quiet",
                "--out",
                str(run),
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["classify", str(run)]) == 2
    assert "needs a conditional run" in capsys.readouterr().err
    assert main(["sample", str(run), "--label", "1"]) == 2
