"""The MNIST table's one-layer rows on one GPU in one command: the VAE (``meanfield``), IWAE
with k = 5 and k = 50 and DReG with k = 50, each trained for ``--minutes`` of wall time by
``mnist_gpu_budget.py`` (dynamic binarization, the IWAE paper's 784-200-200-50 tanh network)
and evaluated with K = ``--eval-particles`` (5000) on all 10 000 test images, then the paired
differences between the rows on the same test images. Four rows at 2 minutes each, with their
evaluations, fit in about 10 minutes of GPU time. ::

    python benchmarks/mnist_gpu_rows.py --data-dir DIR --minutes 2 --out-dir runs/gpu_rows
    # smoke run on a CPU:
    python benchmarks/mnist_gpu_rows.py --data-dir DIR --device cpu --threads 1 --minutes 0.05 \\
        --eval-particles 10 --limit 300 --out-dir /tmp/gpu_rows

``rows.json`` in ``--out-dir`` holds one entry per row (settings, epochs, steps, seconds, test
log p̂ with its standard error, test ELBO, the published number) and the paired differences;
each row's own folder holds its ``budget.json``, ``budget.png`` and ``per_image.pt``. A row
that fails stops the command with one line; the rows already written stay.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any, Sequence

HERE = Path(__file__).resolve().parent
#: (name, estimator, k, published test log p̂ of Burda et al. 2016, Table 1)
ROWS = (("vae", "meanfield", 1, -86.76), ("iwae5", "iwae", 5, -85.54),
        ("iwae50", "iwae", 50, -84.78), ("dreg50", "dreg", 50, None))
EXIT_USER_ERROR = 2


def _sibling(name: str):
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--rows", nargs="+", choices=[r[0] for r in ROWS],
                   default=[r[0] for r in ROWS])
    return p.parse_known_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args, passed = parse_args(argv)
    budget, table = _sibling("mnist_gpu_budget"), _sibling("mnist_table")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for name, estimator, k, published in ROWS:
        if name not in args.rows:
            continue
        folder = args.out_dir / name
        status = budget.main([*passed, "--estimator", estimator, "--importance-samples",
                              str(k), "--out-dir", str(folder)])
        if status != 0:
            print(f"mnist_gpu_rows: the {name} row failed (status {status})", file=sys.stderr)
            return status
        report = json.loads((folder / "budget.json").read_text())
        training = report["training"]
        rows.append({"row": name, "estimator": estimator, "k": k,
                     "minutes": report["config"]["minutes"], "epochs": training["epochs"],
                     "steps": training["steps"], "train_seconds": training["train_seconds"],
                     "eval_seconds": report["eval_seconds"],
                     "eval_particles": report["config"]["eval_particles"],
                     "test_log_px": report["log_px"]["mean"],
                     "test_log_px_stderr": report["log_px"]["stderr"],
                     "test_elbo": report["elbo"]["mean"], "published": published,
                     "environment": report["environment"],
                     "full_protocol": report["full_protocol"]})
        budget.write_json(args.out_dir / "rows.json", {"rows": rows, "pairs": []})
    pairs = table.paired_differences([args.out_dir / r["row"] / "per_image.pt" for r in rows],
                                     [r["row"] for r in rows])
    budget.write_json(args.out_dir / "rows.json", {"rows": rows, "pairs": pairs})
    print("\nrow       epochs  test log p̂ (K = {})      published".format(
        rows[0]["eval_particles"] if rows else "-"))
    for r in rows:
        print(f"{r['row']:8s} {r['epochs']:7d}  {r['test_log_px']:8.3f} ± "
              f"{r['test_log_px_stderr']:.3f}      "
              f"{'—' if r['published'] is None else r['published']}")
    for pair in pairs:
        print(f"{pair['a']} − {pair['b']}: {pair['mean']:+.3f} ± {pair['stderr']:.3f} nats")
    print(f"wrote {args.out_dir / 'rows.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
