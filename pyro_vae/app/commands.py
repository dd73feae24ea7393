"""What each ``pyro-vae`` command does, given its parsed arguments (:mod:`pyro_vae.app.cli` parses
them): a config from the flags, then library calls that are just as usable from Python. ``train``
is :mod:`pyro_vae.app.train_command`; the commands that read a run folder are here."""

from __future__ import annotations

import argparse

from pyro_vae.app.flags import given_flags
from pyro_vae.app.options import (
    RATE_DISTORTION_ONLY,
    check_data_dir,
    check_dist_timeout,
    output_path,
    say_written,
)
from pyro_vae.app.train_command import cmd_train
from pyro_vae.util.errors import ConfigError

BDMC_BATCH = 100  # simulated datapoints per AIS batch of the bdmc command


def _cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from pyro_vae.data.builtin import network_width
    from pyro_vae.runs import load_run
    from pyro_vae.runs.plots import (
        grid_bytes,
        label_rows_layout,
        plot_grid,
        plot_label_rows,
        save_figure,
    )
    from pyro_vae.util.memory import inference_bytes, require

    output, replaced = output_path(args, args.run_dir / f"samples-{args.seed}.png")
    run = load_run(args.run_dir, device=args.device)
    if run.dataset is None or not callable(getattr(run.model, "sample", None)):
        raise ConfigError(
            f"sample draws images: {args.run_dir} is not a run on the built-in "
            "images of a pair with a sample method"
        )
    device = next(run.model.parameters()).device
    if run.model.conditional:
        labels = args.label if args.label else list(range(run.model.num_classes))
        if any(not 0 <= label < run.model.num_classes for label in labels):
            raise ConfigError(f"--label must lie in 0..{run.model.num_classes - 1}")
        per_label = max(1, args.num // len(labels))
        rows = per_label * len(labels)
        rows_per_label, ncols = label_rows_layout(per_label)
        nrows = rows_per_label * len(labels)
    else:
        if args.label:
            raise ConfigError("--label needs a conditional run (pyro-vae train --model cvae)")
        rows, ncols = args.num, max(1, int(round(args.num**0.5)))
        nrows = -(-rows // ncols)
    figure = grid_bytes(nrows, ncols, run.dataset.image_shape, f"a grid of {rows:,} samples")
    require(
        inference_bytes(0, network_width(run.dataset, run.config), rows) + figure,
        f"drawing {rows:,} samples and their grid",
        device,
    )
    generator = torch.Generator(device=device).manual_seed(args.seed)
    if run.model.conditional:
        wanted = torch.tensor(labels, device=device).repeat_interleave(per_label)
        images = run.model.sample(
            len(wanted), mean=not args.binary, generator=generator, labels=wanted
        )
        figure = plot_label_rows(
            images,
            labels,
            per_label,
            run.dataset.image_shape,
            f"samples per label ({per_label} each)",
        )
    else:
        images = run.model.sample(rows, mean=not args.binary, generator=generator)
        figure = plot_grid(images, run.dataset.image_shape, ncols, f"{rows} samples from the prior")
    save_figure(figure, output)
    say_written(output, replaced)
    return 0


def _cmd_ais(args: argparse.Namespace) -> int:
    import pyro
    import torch

    from pyro_vae.core.protocol import data_plate_name
    from pyro_vae.evaluate.ais import ais
    from pyro_vae.evaluate.results import write_netcdf
    from pyro_vae.runs import load_run
    from pyro_vae.runs.evaluation import (
        checkpoint_epoch,
        evaluation_data,
        output_label,
        require_ais_memory,
    )
    from pyro_vae.util.io import atomic_files
    from pyro_vae.util.rng import forked_rng

    run = load_run(args.run_dir, device=args.device, data_dir=args.data_dir)
    data = evaluation_data(run, args.split, args.data, args.limit)
    require_ais_memory(run, args.chains, args.batch_size, data, args.ais_steps)
    with forked_rng(), pyro.get_param_store().scope(), pyro.validation_enabled(False):
        torch.manual_seed(args.seed)
        result = ais(
            run.model.model,
            run.model.guide,
            data,
            num_chains=args.chains,
            num_steps=args.ais_steps,
            start=args.ais_start,
            batch_size=args.batch_size,
            data_plate=data_plate_name(run.model),
        )
    summary = result.summary()
    label = output_label(args.split, args.data)
    out = args.run_dir / f"ais-{label}.json"
    netcdf = args.run_dir / f"ais-{label}.nc"
    with atomic_files() as files:  # both or neither; the netCDF writer in a child process
        files.write_json(
            out,
            {
                **summary,
                "checkpoint_epoch": checkpoint_epoch(run),
                "start": args.ais_start,
                "seed": args.seed,
                "per_datapoint": {
                    "log_px": result.log_px.tolist(),
                    "accept": result.accept.tolist(),
                    "ess": result.ess.tolist(),
                },
            },
        )
        with files.path(netcdf) as tmp:
            write_netcdf(result.to_inference_data(), tmp)
    print(
        f"AIS log p(x) ({summary['num_chains']} chains, {summary['num_steps']} steps from "
        f"the {args.ais_start}): "
        f"{summary['log_px']['mean']:.3f} nats per datapoint over "
        f"{summary['num_datapoints']} datapoints; acceptance {summary['accept']:.2f}"
    )
    print(f"wrote {out.name}, {netcdf.name} in {args.run_dir}")
    return 0


def _cmd_bdmc(args: argparse.Namespace) -> int:
    import pyro
    import torch

    from pyro_vae.core.protocol import data_plate_name
    from pyro_vae.evaluate.bdmc import bdmc, simulate
    from pyro_vae.runs import load_run
    from pyro_vae.runs.evaluation import checkpoint_epoch, require_ais_memory
    from pyro_vae.util.io import write_json
    from pyro_vae.util.rng import forked_rng

    check_data_dir(args)
    run = load_run(args.run_dir, device=args.device, data_dir=args.data_dir)
    if getattr(run.model, "conditional", False):
        raise ConfigError(
            "bdmc simulates data from a model of x alone; a conditional run's "
            "model also takes the label"
        )
    test_data = run.data("test", args.num)
    require_ais_memory(run, args.chains, BDMC_BATCH, test_data, args.ais_steps)
    template = next(iter(test_data.ordered(args.num))).args
    if len(template) != 1:
        raise ConfigError(
            "bdmc simulates data from a model that takes the data as its one argument"
        )
    rows = len(template[0])
    if rows < args.num:
        raise ConfigError(
            f"--num {args.num:,} is more than the {rows:,} test images whose shape the "
            f"simulated data take: give --num {rows:,} or fewer"
        )
    with forked_rng(), pyro.get_param_store().scope(), pyro.validation_enabled(False):
        torch.manual_seed(args.seed)
        data, latents = simulate(run.model.model, run.model.guide, template[0])
        result = bdmc(
            run.model.model,
            run.model.guide,
            data,
            latents,
            num_chains=args.chains,
            num_steps=args.ais_steps,
            batch_size=BDMC_BATCH,
            data_plate=data_plate_name(run.model),
        )
    lower, upper = result.lower.log_px, result.upper.log_px
    summary = {
        "num_datapoints": len(lower),
        "num_chains": args.chains,
        "num_steps": args.ais_steps,
        "seed": args.seed,
        "checkpoint_epoch": checkpoint_epoch(run),
        "lower": lower.mean().item(),
        "upper": upper.mean().item(),
        "gap": result.gap.mean().item(),
        "per_datapoint": {"lower": lower.tolist(), "upper": upper.tolist()},
    }
    out = args.run_dir / "bdmc.json"
    write_json(out, summary)
    print(
        f"BDMC on {len(lower)} simulated datapoints ({args.chains} chains, {args.ais_steps} "
        f"steps): log p(x) between {summary['lower']:.3f} and {summary['upper']:.3f} nats "
        f"(gap {summary['gap']:.3f})"
    )
    print(f"wrote {out.name} in {args.run_dir}")
    return 0


AIS_ONLY = {"ais_steps": 500, "chains": 16, "ais_start": "guide"}
IMPORTANCE_ONLY = ("particles", "particle_chunk")


def _fill_evaluate_options(args: argparse.Namespace) -> None:
    """Refuse the options that do nothing in the evaluation asked for (the AIS options without
    ``--ais``, the importance sampler's with it, ``--split`` with ``--data``, ``--data-dir``
    for a run without MNIST files, ``--dist-timeout`` outside torchrun); fill in the defaults
    of the others."""
    from pyro_vae.runs import EvalConfig

    if args.data is not None and args.split is not None:
        raise ConfigError(
            "--split picks a split of the run's dataset; with --data those data are evaluated: "
            "give one of them"
        )
    check_data_dir(args)
    check_dist_timeout(args)
    unused = given_flags(args, IMPORTANCE_ONLY if args.ais else AIS_ONLY)
    rd_unused = "" if args.rate_distortion else given_flags(args, RATE_DISTORTION_ONLY)
    if rd_unused or (args.rate_distortion and args.ais):
        raise ConfigError(
            f"{rd_unused} need(s) --rate-distortion"
            if rd_unused
            else "--rate-distortion applies to importance sampling, not to --ais"
        )
    if unused:
        raise ConfigError(
            f"{unused} appl(ies) to importance sampling, not to --ais"
            if args.ais
            else f"{unused} need(s) --ais (without it importance sampling runs)"
        )
    defaults = EvalConfig()
    if args.split is None:
        args.split = defaults.split
    for name, value in {**AIS_ONLY, **{k: getattr(defaults, k) for k in IMPORTANCE_ONLY}}.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from pyro_vae.evaluate import format_table
    from pyro_vae.runs import evaluate_run, read_config
    from pyro_vae.util.distributed import current_context

    _fill_evaluate_options(args)
    if args.ais:
        return _cmd_ais(args)

    result = evaluate_run(
        args.run_dir,
        particles=args.particles,
        split=args.split,
        data=args.data,
        limit=args.limit,
        batch_size=args.batch_size,
        particle_chunk=args.particle_chunk,
        seed=args.seed,
        device=args.device,
        data_dir=args.data_dir,
        progress=not args.quiet,
        dist_timeout=args.dist_timeout,
        rate_distortion=_rate_distortion_options(args),
    )
    if not current_context().is_main:
        return 0
    model = read_config(args.run_dir).model
    conditional = model is not None and model.family == "cvae"
    print(format_table(result.summary(), observed="x, y" if conditional else "x"))
    if result.rate_distortion is not None:
        from pyro_vae.evaluate import format_rate_distortion

        print(format_rate_distortion(result.rate_distortion.summary()))
    print(f"wrote {', '.join(path.name for path in result.paths.values())} in {args.run_dir}")
    return 0


def _rate_distortion_options(args: argparse.Namespace):
    """The options of ``--rate-distortion`` (``None`` without it), the defaults for those
    not given; ``--surgery-points 0`` leaves the surgery out."""
    if not args.rate_distortion:
        return None
    from pyro_vae.evaluate.rate_distortion import RateDistortionOptions

    given = {
        "num_particles": args.rd_particles,
        "surgery_points": args.surgery_points,
        "prior_draws": args.prior_draws,
        "hole_percentile": args.hole_percentile,
    }
    chosen = {name: value for name, value in given.items() if value is not None}
    if chosen.get("surgery_points") == 0:
        chosen["surgery_points"] = None
    return RateDistortionOptions(**chosen)


def _load_conditional_run(args: argparse.Namespace):
    from pyro_vae.runs import load_run

    check_data_dir(args)
    run = load_run(args.run_dir, device=args.device, data_dir=args.data_dir)
    if run.dataset is None or not getattr(run.model, "conditional", False):
        raise ConfigError(
            f"{args.command} needs a conditional run: train one with pyro-vae train --model cvae"
        )
    return run


def _cmd_classify(args: argparse.Namespace) -> int:
    import torch

    from pyro_vae.app.classify import classify, format_classification, save_classification
    from pyro_vae.data.builtin import network_width
    from pyro_vae.runs import EvalConfig
    from pyro_vae.runs.evaluation import checkpoint_epoch
    from pyro_vae.util.memory import inference_bytes, require
    from pyro_vae.util.rng import forked_rng

    run = _load_conditional_run(args)
    images = run.eval_images(args.split)
    labels = getattr(run.dataset, args.split).labels
    if args.limit is not None:
        images, labels = images[: args.limit], labels[: args.limit]
    classes = run.model.num_classes
    pairs = min(max(1, args.batch_size // classes) * classes, len(images) * classes)
    chunk = min(EvalConfig.particle_chunk, args.particles)
    require(
        inference_bytes(0, network_width(run.dataset, run.config), pairs * chunk),
        f"classifying with {args.particles:,} particles in chunks of {chunk:,} on batches "
        f"of {pairs:,} image-label pairs",
        images.device,
    )
    with forked_rng():
        torch.manual_seed(args.seed)
        result = classify(
            run.model, images, labels, num_particles=args.particles, batch_size=args.batch_size
        )
    paths = save_classification(
        result, args.run_dir, args.split, {"checkpoint_epoch": checkpoint_epoch(run)}
    )
    print(format_classification(result.summary()))
    print(f"wrote {paths['json'].name} and {paths['confusion'].name} in {args.run_dir}")
    return 0


def _cmd_transfer(args: argparse.Namespace) -> int:
    import torch

    from pyro_vae.runs.plots import plot_grid, save_figure

    output, replaced = output_path(args, args.run_dir / "transfer.png")
    run = _load_conditional_run(args)
    available = len(run.dataset.test)
    if args.num > available:
        raise ConfigError(f"--num {args.num} is more than the {available} test images")
    from pyro_vae.runs.plots import grid_bytes
    from pyro_vae.util.memory import require

    require(
        grid_bytes(
            args.num,
            run.model.num_classes + 1,
            run.dataset.image_shape,
            f"a grid of {args.num:,} style transfers",
        ),
        f"drawing a grid of {args.num:,} style transfers",
    )
    images = run.eval_images("test")[: args.num]
    labels = run.dataset.test.labels[: args.num]
    decoded = run.model.transfer(images, labels)
    grid = torch.cat([images.unsqueeze(1), decoded], dim=1).flatten(0, 1)
    figure = plot_grid(
        grid,
        run.dataset.image_shape,
        ncols=run.model.num_classes + 1,
        title="style transfer: source image, then decoded with each label",
        row_labels=[f"y={int(label)}" for label in labels],
        col_labels=["source", *map(str, range(run.model.num_classes))],
    )
    save_figure(figure, output)
    say_written(output, replaced)
    return 0


COMMANDS = {
    "train": cmd_train,
    "sample": _cmd_sample,
    "evaluate": _cmd_evaluate,
    "classify": _cmd_classify,
    "transfer": _cmd_transfer,
    "bdmc": _cmd_bdmc,
}
