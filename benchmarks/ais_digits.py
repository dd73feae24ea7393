"""Importance sampling against AIS on trained VAEs, one per estimator: how much of log p(x)
the guide's importance weights miss, and what annealing recovers, with the time each took.
Trains ``--epochs`` of ``meanfield``, ``iwae`` (k = 5) and ``dreg`` (k = 5) on the bundled
digits (or, with ``--dataset mnist``, on dynamically binarized MNIST with the IWAE paper's
784-200-200-50 tanh network), then scores the first ``--images`` test images (their fixed
binarization) with log p̂_K (K = ``--particles``) and AIS at each of ``--steps`` (``--chains``
chains), and BDMC on as many images simulated from each model.

    python benchmarks/ais_digits.py --epochs 100 --images 100 --steps 100 500 --out ais.json
    python benchmarks/ais_digits.py --dataset mnist --data-dir DIR --epochs 10 --images 100 \
        --steps 100 500 --out ais_mnist.json
"""

from __future__ import annotations

import argparse
import sys
import time

import pyro
import torch

from pyro_vae import ModelConfig, TrainConfig, fit
from pyro_vae.data.builtin import evaluation_images
from pyro_vae.data.images import load_dataset
from pyro_vae.evaluate import evaluate_dataset
from pyro_vae.evaluate.ais import ais
from pyro_vae.evaluate.bdmc import bdmc, simulate
from pyro_vae.util.io import write_json

ROWS = [("meanfield", 1), ("iwae", 5), ("dreg", 5)]
#: the IWAE paper's one-layer MNIST network
MNIST_NETWORK = ModelConfig(latent_dim=50, hidden=(200, 200), activation="tanh")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", choices=("digits", "mnist"), default="digits")
    p.add_argument("--data-dir", help="folder with the MNIST IDX files (--dataset mnist)")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--images", type=int, default=100)
    p.add_argument("--particles", type=int, default=5000)
    p.add_argument("--steps", type=int, nargs="+", default=[100, 500])
    p.add_argument("--chains", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="JSON file for the results")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for elbo, k in ROWS:
        config = TrainConfig(
            dataset=args.dataset,
            data_dir=args.data_dir,
            elbo=elbo,
            importance_samples=k,
            epochs=args.epochs,
            seed=0,
            final_particles=0,
            device="cpu",
            **(
                {"model": MNIST_NETWORK, "batch_size": 128, "eval_particles": 1}
                if args.dataset == "mnist"
                else {}
            ),
        )
        start = time.perf_counter()
        model = fit(config=config, progress=False).model
        model.eval()
        dataset = load_dataset(args.dataset, args.data_dir)
        images = evaluation_images(dataset, "test", config)[: args.images]
        row = {
            "elbo": elbo,
            "k": k,
            "epochs": args.epochs,
            "train_seconds": time.perf_counter() - start,
        }
        with pyro.validation_enabled(False), torch.no_grad():
            torch.manual_seed(0)
            start = time.perf_counter()
            scored = evaluate_dataset(
                model.model, model.guide, images, num_particles=args.particles, khat=False
            )
            row["is"] = {
                "log_px": scored.log_px.mean().item(),
                "seconds": time.perf_counter() - start,
            }
        for steps in args.steps:
            with pyro.validation_enabled(False):
                torch.manual_seed(0)
                start = time.perf_counter()
                result = ais(
                    model.model, model.guide, images, num_chains=args.chains, num_steps=steps
                )
                row[f"ais_{steps}"] = {
                    "log_px": result.log_px.mean().item(),
                    "accept": result.accept.mean().item(),
                    "seconds": time.perf_counter() - start,
                }
                torch.manual_seed(0)
                data, latents = simulate(model.model, model.guide, images)
                start = time.perf_counter()
                bracket = bdmc(
                    model.model, model.guide, data, latents, num_chains=args.chains, num_steps=steps
                )
                row[f"bdmc_{steps}"] = {
                    "lower": bracket.lower.log_px.mean().item(),
                    "upper": bracket.upper.log_px.mean().item(),
                    "gap": bracket.gap.mean().item(),
                    "seconds": time.perf_counter() - start,
                }
        rows.append(row)
        cells = "  ".join(
            f"AIS T={s} {row[f'ais_{s}']['log_px']:.3f} "
            f"({row[f'ais_{s}']['seconds']:.0f} s), BDMC gap "
            f"{row[f'bdmc_{s}']['gap']:.3f}"
            for s in args.steps
        )
        print(
            f"{elbo} k={k}: IS K={args.particles} {row['is']['log_px']:.3f} "
            f"({row['is']['seconds']:.1f} s)  {cells}",
            flush=True,
        )
        if args.out:
            write_json(
                args.out,
                {
                    "rows": rows,
                    "dataset": args.dataset,
                    "images": args.images,
                    "chains": args.chains,
                    "command": " ".join([sys.executable, *sys.argv]),
                },
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
