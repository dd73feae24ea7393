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

``--parallel`` trains the rows at the same time, one process each on the same device: a step of
this small network leaves most of a GPU idle (its time is the launches), so rows at once can
each get several times the training in the same GPU time, e.g. ``--parallel --minutes 7`` for
about 9 minutes in all (each row's steps per second in its ``budget.json`` say how much).
Each row's output is then in its folder's ``log.txt``. ::

    python benchmarks/mnist_gpu_rows.py --data-dir DIR --parallel --minutes 7 \
        --out-dir runs/gpu_rows

``rows.json`` in ``--out-dir`` holds one entry per row (settings, epochs, steps, seconds, test
log p̂ with its standard error, test ELBO, the published number) and the paired differences;
each row's own folder holds its ``budget.json``, ``budget.png`` and ``per_image.pt``. A row
that fails stops the command with one line; the rows already written stay (in parallel, the
other rows finish and are written, and the command still fails).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BUDGET_SCRIPT = HERE / "mnist_gpu_budget.py"
#: (name, estimator, k, published test log p̂ of Burda et al. 2016, Table 1)
ROWS = (
    ("vae", "meanfield", 1, -86.76),
    ("iwae5", "iwae", 5, -85.54),
    ("iwae50", "iwae", 50, -84.78),
    ("dreg50", "dreg", 50, None),
)
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
    p.add_argument("--rows", nargs="+", choices=[r[0] for r in ROWS], default=[r[0] for r in ROWS])
    p.add_argument(
        "--parallel",
        action="store_true",
        help="train the rows at the same time, one process each on the same device",
    )
    return p.parse_known_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args, passed = parse_args(argv)
    budget, table = _sibling("mnist_gpu_budget"), _sibling("mnist_table")
    chosen = [row for row in ROWS if row[0] in args.rows]
    fresh = [
        path for path in (args.out_dir, *(args.out_dir / r[0] for r in chosen)) if not path.exists()
    ]  # removed again if no row gets written
    args.out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    failed = 0
    if args.parallel:
        errors = {}  # a failed row's last line of output, by row
        for row, status in zip(chosen, run_parallel(chosen, passed, args.out_dir)):
            log = args.out_dir / row[0] / "log.txt"
            if status == 0:
                rows.append(row_entry(row, args.out_dir / row[0]))
            else:
                errors[row[0]] = (log.read_text().strip().splitlines() or [f"status {status}"])[-1]
                failed = failed or status
        if not rows and len(set(errors.values())) == 1:  # bad input: one line
            print(
                f"mnist_gpu_rows: every row failed ({next(iter(errors.values()))})", file=sys.stderr
            )
        else:
            for name, line in errors.items():
                print(f"mnist_gpu_rows: the {name} row failed ({line})", file=sys.stderr)
    else:
        for row in chosen:
            folder = args.out_dir / row[0]
            failed = budget.main(row_budget_args(row, passed, folder))
            if failed:
                print(f"mnist_gpu_rows: the {row[0]} row failed (status {failed})", file=sys.stderr)
                break
            rows.append(row_entry(row, folder))
            budget.write_json(args.out_dir / "rows.json", {"rows": rows, "pairs": []})
    if not rows:
        for path in reversed(fresh):
            shutil.rmtree(path, ignore_errors=True)
        return failed
    pairs = table.paired_differences(
        [args.out_dir / r["row"] / "per_image.pt" for r in rows], [r["row"] for r in rows]
    )
    budget.write_json(args.out_dir / "rows.json", {"rows": rows, "pairs": pairs})
    print(
        "\nrow       epochs  test log p̂ (K = {})      published".format(rows[0]["eval_particles"])
    )
    for r in rows:
        print(
            f"{r['row']:8s} {r['epochs']:7d}  {r['test_log_px']:8.3f} ± "
            f"{r['test_log_px_stderr']:.3f}      "
            f"{'—' if r['published'] is None else r['published']}"
        )
    for pair in pairs:
        print(f"{pair['a']} − {pair['b']}: {pair['mean']:+.3f} ± {pair['stderr']:.3f} nats")
    print(f"wrote {args.out_dir / 'rows.json'}")
    return failed


def row_budget_args(row: tuple, passed: list[str], folder: Path) -> list[str]:
    """``mnist_gpu_budget.py``'s arguments for one row."""
    _, estimator, k, _ = row
    return [
        *passed,
        "--estimator",
        estimator,
        "--importance-samples",
        str(k),
        "--out-dir",
        str(folder),
    ]


def run_parallel(chosen: list[tuple], passed: list[str], out_dir: Path) -> list[int]:
    """Start every row's ``mnist_gpu_budget.py`` at once (its output to ``log.txt`` in the
    row's folder) and wait for all of them; their exit statuses, in order."""
    processes = []
    for row in chosen:
        folder = out_dir / row[0]
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "log.txt", "w") as log:
            processes.append(
                subprocess.Popen(
                    [sys.executable, str(BUDGET_SCRIPT), *row_budget_args(row, passed, folder)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
    return [process.wait() for process in processes]


def row_entry(row: tuple, folder: Path) -> dict[str, Any]:
    """A row of ``rows.json`` from the row's ``budget.json``."""
    name, estimator, k, published = row
    report = json.loads((folder / "budget.json").read_text())
    training = report["training"]
    return {
        "row": name,
        "estimator": estimator,
        "k": k,
        "minutes": report["config"]["minutes"],
        "epochs": training["epochs"],
        "steps": training["steps"],
        "train_seconds": training["train_seconds"],
        "eval_seconds": report["eval_seconds"],
        "eval_particles": report["config"]["eval_particles"],
        "test_log_px": report["log_px"]["mean"],
        "test_log_px_stderr": report["log_px"]["stderr"],
        "test_elbo": report["elbo"]["mean"],
        "published": published,
        "environment": report["environment"],
        "full_protocol": report["full_protocol"],
    }


if __name__ == "__main__":
    sys.exit(main())
