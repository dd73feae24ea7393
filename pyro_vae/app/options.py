"""The command line's option types and the options several commands share: each value checked
as it is parsed (one line and status :data:`EXIT_USER_ERROR` for a bad one)."""

from __future__ import annotations

import argparse
import os
import stat
import sys
from pathlib import Path

from pyro_vae.models.config import check_seed
from pyro_vae.util.errors import ConfigError, PyroVAEError

EXIT_USER_ERROR = 2
DEVICE_HELP = "auto (CUDA if available, else CPU), cpu or cuda (default auto)"
#: the time a command's estimated work may take unless --max-seconds says otherwise
DEFAULT_MAX_SECONDS = 3600.0


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line and exit status :data:`EXIT_USER_ERROR`
    (the usage is one ``--help`` away), and which reads no abbreviation of an option (``--data``
    is not ``--data-dir``): its subcommands' parsers are of this class too."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None):
        """As argparse's, but an argument no parser took is told by the subcommand it was
        given to (``pyro-vae classify: error: unrecognized arguments: --quiet``)."""
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            self._command_parser(namespace).error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace

    def _command_parser(self, namespace: argparse.Namespace) -> argparse.ArgumentParser:
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                chosen = action.choices.get(getattr(namespace, action.dest, None))
                if chosen is not None:
                    return chosen
        return self


def parse_seed(text: str) -> int:
    """An argparse ``type``: ``text`` as a seed that :func:`~pyro_vae.models.config.check_seed`
    accepts, else :class:`argparse.ArgumentTypeError` with a one-line reason."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    try:
        return check_seed(value)
    except PyroVAEError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def path_arg(text: str) -> Path:
    """An argparse ``type`` for a path: an empty one (an unset shell variable) would otherwise
    become the current folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError("the path is empty (an unset shell variable?)")
    return Path(text)


def add_output(parser: argparse.ArgumentParser, default: str) -> None:
    """``--output FILE.png`` (``default`` when not given) and ``--force``, which lets it
    replace a file: :func:`output_path` checks them."""
    parser.add_argument(
        "--output", type=path_arg, help=f"PNG path (default {default}); a file there needs --force"
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="let --output replace a file (never a run's own file, a folder or a device)",
    )


#: what a path that is not a regular file is, by its mode
_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISLNK, "a symbolic link"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a device"),
    (stat.S_ISBLK, "a device"),
    (stat.S_ISSOCK, "a socket"),
)


def output_path(args: argparse.Namespace, default: Path) -> tuple[Path, bool]:
    """The PNG file a command writes (``args.output``, else ``default``) and whether it
    replaces a file (``--force``); :class:`~pyro_vae.util.errors.ConfigError` before any work
    for a path that exists and is not a regular file (a folder, a device, a FIFO, a link),
    and for a given ``--output`` in a missing folder, that is a run's own file
    (:func:`~pyro_vae.runs.folder.is_run_file`), whose name does not end in ``.png``, or that
    exists without ``--force``."""
    from pyro_vae.runs.folder import is_run_file

    path = default if args.output is None else args.output
    named = f"--output {path}" if args.output is not None else str(path)
    if args.force and args.output is None:
        raise ConfigError("--force lets --output replace a file: give it with --output FILE.png")
    try:
        mode = os.lstat(path).st_mode
    except OSError as exc:  # in RUN_DIR, a path through a file: loading the run says so
        if args.output is not None and not isinstance(exc, FileNotFoundError):
            raise
        mode = None
    if mode is not None and not stat.S_ISREG(mode):
        kind = next((what for test, what in _KINDS if test(mode)), "not a file")
        raise ConfigError(f"{named} is {kind}, not a regular file: name a .png file")
    if args.output is None:
        return path, False
    if not path.parent.is_dir():
        raise ConfigError(f"{named}: the folder {path.parent} does not exist")
    if is_run_file(path):
        raise ConfigError(
            f"{named} is a file of the run in {path.parent}: name a .png file of your own"
        )
    if path.suffix.lower() != ".png":
        raise ConfigError(f"{named} does not end in .png: the file written is a PNG image")
    if mode is not None and not args.force:
        raise ConfigError(f"{named} exists: give --force to replace it, or name a new file")
    return path, mode is not None


def say_written(path: Path, replaced: bool) -> None:
    """``wrote PATH``, and the file replaced (``--force``) in one line of its own."""
    if replaced:
        print(f"pyro-vae: {path} existed: replaced it (--force)", file=sys.stderr)
    print(f"wrote {path}")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def layer_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated layer sizes like 256,128, got {text!r}"
        ) from None
    if not sizes or any(size < 1 for size in sizes):
        raise argparse.ArgumentTypeError(f"layer sizes must be >= 1, got {text!r}")
    return sizes


def memory_size(text: str) -> int:
    from pyro_vae.util.memory import parse_size

    try:
        return parse_size(text)
    except PyroVAEError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_max_memory(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-memory",
        type=memory_size,
        metavar="SIZE",
        help="refuse, before allocating, sizes whose estimated memory exceeds "
        "SIZE (512M, 4G, ...; default: the memory free on the device)",
    )


def add_max_seconds(
    parser: argparse.ArgumentParser, default: float | None = DEFAULT_MAX_SECONDS
) -> None:
    shown = "no bound" if default is None else f"{default:g}"
    parser.add_argument(
        "--max-seconds",
        type=positive_float,
        default=default,
        metavar="SECONDS",
        help="refuse, after timing its first pieces (steps, particle chunks), "
        f"work whose estimated time exceeds SECONDS (default {shown})",
    )


def add_dist_timeout(parser: argparse.ArgumentParser) -> None:
    from pyro_vae.util.distributed import DEFAULT_TIMEOUT_S, ENV_TIMEOUT

    parser.add_argument(
        "--dist-timeout",
        type=positive_float,
        metavar="SECONDS",
        help="under torchrun: how long a rank waits for the others before "
        f"failing (default ${ENV_TIMEOUT} or {DEFAULT_TIMEOUT_S:g})",
    )


def check_dist_timeout(args: argparse.Namespace) -> None:
    """Refuse ``--dist-timeout`` in a process that torchrun did not start (``WORLD_SIZE`` unset
    or 1): it waits for no other rank."""
    try:
        alone = int(os.environ.get("WORLD_SIZE") or 1) <= 1
    except ValueError:
        return  # joining the ranks says what is wrong with WORLD_SIZE
    if args.dist_timeout is not None and alone:
        raise ConfigError(
            "--dist-timeout is how long a rank waits for the others under torchrun: this "
            "process is the only one (WORLD_SIZE unset or 1)"
        )


def check_data_dir(args: argparse.Namespace) -> None:
    """Refuse ``--data-dir`` for a run (``args.run_dir``) that reads no MNIST files."""
    if getattr(args, "data_dir", None) is None:
        return
    from pyro_vae.runs import read_config

    dataset = read_config(args.run_dir).dataset
    if dataset != "mnist":
        raise ConfigError(
            f"--data-dir locates the MNIST files; the run in {args.run_dir} "
            + (
                f"is of the {dataset} images, which ship with the package"
                if dataset
                else "reads the data it was given, not MNIST's"
            )
        )


def json_object(text: str) -> dict:
    """An argparse ``type``: ``text`` as a JSON object (``'{"momentum": 0.9}'``). JSON has no
    ``NaN`` or ``Infinity`` (Python's reader takes them, other readers of config.json do not):
    an option that takes an infinity takes it as a string, ``"-inf"``."""
    import json

    def refuse(constant: str) -> None:
        raise ValueError(
            f'{constant} is not JSON: write a string such as "-inf" where an option takes one'
        )

    try:
        value = json.loads(text, parse_constant=refuse)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r} ({exc})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def add_optimizer_options(parser: argparse.ArgumentParser, default: str) -> None:
    """``--optimizer`` (``default`` unless given), ``--optimizer-options``, ``--scheduler``,
    ``--scheduler-options`` and ``--clip-norm``: how the steps update the parameters."""
    from pyro_vae.util.optimizers import OPTIMIZERS, SCHEDULERS

    parser.add_argument(
        "--optimizer",
        choices=tuple(OPTIMIZERS),
        metavar="NAME",
        help=f"a torch.optim optimizer, in lower case: {', '.join(OPTIMIZERS)} (default {default})",
    )
    parser.add_argument(
        "--optimizer-options",
        type=json_object,
        metavar="JSON",
        help="the optimizer's keyword options as a JSON object, e.g. '{\"momentum\": 0.9}'",
    )
    parser.add_argument(
        "--scheduler",
        choices=tuple(SCHEDULERS),
        metavar="NAME",
        help="a torch.optim.lr_scheduler scheduler, in lower case, stepped after each epoch: "
        f"{', '.join(SCHEDULERS)} (default: none)",
    )
    parser.add_argument(
        "--scheduler-options",
        type=json_object,
        metavar="JSON",
        help="the scheduler's keyword options as a JSON object, e.g. '{\"step_size\": 10}'",
    )
    parser.add_argument(
        "--clip-norm",
        type=positive_float,
        metavar="MAX",
        help="scale each step's gradients down to this total norm when they exceed it",
    )


def _whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def _surgery_points(text: str) -> int:
    value = _whole_number(text)
    if value < 0 or value == 1:
        raise argparse.ArgumentTypeError(f"expected 0 (none) or a number >= 2, got {value}")
    return value


def _prior_draws(text: str) -> int:
    value = _whole_number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return value


def _percentile(text: str) -> float:
    value = positive_float(text)
    if not value < 100:
        raise argparse.ArgumentTypeError(f"expected a percentile between 0 and 100, got {text}")
    return value


#: the options of ``evaluate --rate-distortion`` (their Python names), which need it
RATE_DISTORTION_ONLY = ("rd_particles", "surgery_points", "prior_draws", "hole_percentile")


def add_rate_distortion_options(parser: argparse.ArgumentParser) -> None:
    """``--rate-distortion`` and its options (``None`` when not given: the defaults are
    :class:`~pyro_vae.evaluate.rate_distortion.RateDistortionOptions`')."""
    from pyro_vae.evaluate.rate_distortion import RateDistortionOptions

    defaults = RateDistortionOptions()
    parser.add_argument(
        "--rate-distortion",
        action="store_true",
        help="also the rate-distortion diagnostics: per datapoint the rate KL(q(z|x) || p(z)) "
        "and distortion -E_q log p(x|z), KL per latent dimension, active units, ELBO surgery "
        "and the prior-hole check, into eval-<split>.json and .nc (and holes-<split>.png)",
    )
    parser.add_argument(
        "--rd-particles",
        type=positive_int,
        help=f"draws z ~ q(z|x) per datapoint of --rate-distortion "
        f"(default {defaults.num_particles})",
    )
    parser.add_argument(
        "--surgery-points",
        type=_surgery_points,
        help="ELBO surgery of --rate-distortion on the first N datapoints: N^2 guide "
        f"densities (default {defaults.surgery_points}; 0: none)",
    )
    parser.add_argument(
        "--prior-draws",
        type=_prior_draws,
        help=f"prior draws of the prior-hole check (default {defaults.prior_draws}; 0: none)",
    )
    parser.add_argument(
        "--hole-percentile",
        type=_percentile,
        help="a prior draw is in a hole below this percentile of the data codes' "
        f"log q(z) (default {defaults.hole_percentile:g})",
    )
