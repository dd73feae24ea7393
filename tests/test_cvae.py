import json

import pyro
import pytest
import torch

from pyro_vae import DataError
from pyro_vae.classify import class_log_joint, classify
from pyro_vae.cli import main
from pyro_vae.cvae import CVAE
from pyro_vae.evaluate import evaluate
from pyro_vae.objectives import make_estimator

CLASSES, BLOCK = 3, 4


def separable_data(n_per_class=30, seed=0):
    """Class c lights pixel block c (probability 0.9) and leaves the others dark (0.1)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(CLASSES).repeat_interleave(n_per_class)
    probs = torch.full((labels.shape[0], CLASSES * BLOCK), 0.1)
    for c in range(CLASSES):
        probs[labels == c, c * BLOCK:(c + 1) * BLOCK] = 0.9
    return torch.bernoulli(probs, generator=generator), labels


def fitted_cvae(images, labels, steps=300):
    model = CVAE(images.shape[1], CLASSES, latent_dim=2, hidden=(16,))
    model.set_class_probs(labels)
    elbo = make_estimator("meanfield", num_particles=4, max_plate_nesting=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    with pyro.validation_enabled(False):
        for _ in range(steps):
            optimizer.zero_grad()
            (elbo.differentiable_loss(model.model, model.guide, images, labels)
             / images.shape[0]).backward()
            optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def trained():
    pyro.set_rng_seed(0)
    images, labels = separable_data()
    return fitted_cvae(images, labels), images, labels


def test_generative_classifier_separates_separable_classes(trained):
    model, _, _ = trained
    test_images, test_labels = separable_data(n_per_class=20, seed=1)
    result = classify(model, test_images, test_labels, num_particles=50)
    assert result.accuracy >= 0.95
    assert torch.allclose(result.posterior.sum(1), torch.ones(60, dtype=result.posterior.dtype))
    matrix = result.confusion_matrix()
    assert matrix.sum() == 60 and matrix.trace() == (result.predicted == test_labels).sum()


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
        single = evaluate(model.model, model.guide, images, labels, num_particles=particles,
                          keep_log_weights=True)
        weights = torch.softmax(single.log_weights.double(), dim=0) * particles
        stderr = weights.std(0) / particles ** 0.5
        assert ((vectorized[:, c] - single.log_px).abs() < 5 * 2 ** 0.5 * stderr + 1e-4).all()


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


@pytest.mark.parametrize("labels, message", [
    (torch.tensor([0, 1, 3]), "labels must be integers in 0..2"),
    (torch.tensor([0, -1, 2]), "labels must be integers in 0..2"),
    (torch.tensor([0, 1]), "expected 3 labels"),
])
def test_bad_labels_get_a_clear_message(trained, labels, message):
    model, images, _ = trained
    with pytest.raises(DataError, match=message):
        classify(model, images[:3], labels, num_particles=2)
    with pytest.raises(DataError, match=message):
        model.guide(images[:3], labels)


def test_cli_classify_transfer_and_labelled_samples(tmp_path, capsys):
    run = tmp_path / "cvae"
    assert main(["train", "--model", "cvae", "--epochs", "1", "--batch-size", "256",
                 "--hidden", "16", "--latent-dim", "2", "--quiet", "--out", str(run)]) == 0
    assert main(["classify", str(run), "--particles", "3", "--limit", "20"]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "confusion matrix" in out
    report = json.loads((run / "classify-test.json").read_text())
    assert len(report["posterior"]) == 20 and len(report["posterior"][0]) == 10
    assert (run / "confusion-test.png").exists()
    assert main(["transfer", str(run), "--num", "3"]) == 0
    assert (run / "transfer.png").exists()
    assert main(["sample", str(run), "--label", "3", "--num", "4"]) == 0
    assert main(["sample", str(run), "--label", "12"]) == 2
    assert "--label must lie in 0..9" in capsys.readouterr().err


def test_cli_refuses_cvae_commands_on_a_plain_vae(tmp_path, capsys):
    run = tmp_path / "vae"
    assert main(["train", "--epochs", "1", "--batch-size", "256", "--hidden", "16",
                 "--latent-dim", "2", "--quiet", "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["classify", str(run)]) == 2
    assert "needs a conditional run" in capsys.readouterr().err
    assert main(["sample", str(run), "--label", "1"]) == 2
