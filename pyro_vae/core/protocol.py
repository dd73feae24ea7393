"""What the package needs from a user's own model/guide pair, stated and checked in one place.

A pair works with the training engine (:func:`pyro_vae.fit`), the evaluator
(:mod:`pyro_vae.evaluate`) and the estimators (:mod:`pyro_vae.infer`) when:

1. it is a :class:`torch.nn.Module` that owns every learnable parameter (a model and a guide
   in another form, plain functions with ``pyro.param``, a ``PyroModule`` model, an AutoGuide,
   are held by a :class:`~pyro_vae.core.pairs.PyroPair`, which owns them: ``fit(model, guide,
   data)``; so one
   ``torch.optim`` optimizer over ``module.parameters()`` trains it, and a ``state_dict``
   checkpoints it): every ``param`` site of the model and guide is one of
   ``module.parameters()`` (as those of ``pyro.module(name, self)`` are) or the constrained value
   of one (a :class:`~pyro.nn.PyroParam` of a :class:`~pyro.nn.PyroModule`), never a free
   ``pyro.param("W", init)``, which the optimizer would not see;
2. it has callables ``model(*args, **kwargs)`` and ``guide(*args, **kwargs)`` that take one
   batch (:mod:`pyro_vae.data.batches`: a tensor gives one positional argument, a tuple several, a
   dict keyword arguments); on the built-in images that is ``model(x)``, or ``model(x, y)``
   with ``conditional = True`` (``y`` the integer labels);
3. every observed site and every local latent lies inside one ``pyro.plate`` over the batch's
   datapoints, sized with the batch's length or left unsized: the one plate that holds every
   site (or every observed site), or the plate the attribute ``data_plate`` names (needed when
   several plates qualify); plates nested inside it are summed per datapoint; latent
   dimensions are events (``.to_event(1)``), so each datapoint has one log-density per site (a
   batch dimension in no plate is refused). Latents outside the data plate are global: drawn
   once per particle and shared by the batch, on the same side of the plate in model and
   guide, broadcasting against the particle dimension (a global site's value is
   ``[P, 1, ...]`` under a particle plate);
4. the guide's latent sites are reparameterizable (``has_rsample``), as every Gaussian is.

Optional attributes, used when present: ``name`` (the prefix of the pair's Pyro param-store
entries, replaced by :func:`~pyro_vae.fit`), ``initialize_from_data(images)`` (called
before training a freshly built model of the package), and ``sample(n)``, ``encode(x)``,
``reconstruct(x)`` for
the plots of a run folder (a run without them gets the training curves only).
"""

from __future__ import annotations

from typing import Any

import torch
from pyro import poutine
from torch import nn
from torch.distributions import constraints

from pyro_vae.core.arguments import batch_length, floating_tensors
from pyro_vae.core.enumeration import is_enumerated
from pyro_vae.core.pairs import isolated_run
from pyro_vae.core.traces import DATA_PLATE, find_data_plate, trace_pair
from pyro_vae.util import usercode
from pyro_vae.util.errors import ConfigError, DataError
from pyro_vae.util.rng import forked_rng

UNSIZED = -1  # the size Pyro gives a plate declared without one


def data_plate_name(module: Any) -> str | None:
    """The plate the module names as its data plate (``data_plate``), or ``None``: the one plate
    that holds every sample site, found as the evaluator and the estimators find it."""
    return getattr(module, "data_plate", None)


def _foreign_params(module: nn.Module, *traces: Any) -> list[str]:
    """The names of the ``param`` sites of ``traces`` whose values are not ``module``'s
    parameters. A site's value is the constrained value of a param-store entry; its
    ``unconstrained()`` is the tensor the store holds (the one ``pyro.infer.SVI`` would optimize),
    which must be one of the module's: a parameter registered by ``pyro.module``, or the
    unconstrained parameter behind a ``PyroParam``."""
    owned = {id(p) for p in module.parameters()}
    foreign = []
    for trace in traces:
        for name, site in trace.nodes.items():
            if site["type"] != "param" or name in foreign:
                continue
            unconstrained = getattr(site["value"], "unconstrained", None)
            leaf = unconstrained() if callable(unconstrained) else site["value"]
            if id(leaf) not in owned:
                foreign.append(name)
    return foreign


def check_model(module: Any, *example_args: Any, **example_kwargs: Any) -> None:
    """Raise :class:`~pyro_vae.util.errors.ConfigError` naming the first requirement (see the module
    docstring) that ``module`` misses; with ``example_args`` / ``example_kwargs`` (a small
    batch) the pair is also run once to check its plate and sites."""
    what = type(module).__name__
    if not isinstance(module, nn.Module):
        raise ConfigError(
            f"{what} must be a torch.nn.Module that owns the parameters of its model and guide"
        )
    for method in ("model", "guide"):
        if not callable(getattr(module, method, None)):
            raise ConfigError(f"{what} needs a callable {method}(x) method (the Pyro {method})")
    if not any(p.requires_grad for p in module.parameters()):
        raise ConfigError(
            f"{what} has no trainable parameters: register its networks as "
            "submodules (self.encoder = ...) or nn.Parameter attributes"
        )
    if not example_args and not example_kwargs:
        return
    rows = batch_length(example_args, example_kwargs)
    plate = data_plate_name(module) or DATA_PLATE
    hint = (
        f"every sample site belongs inside pyro.plate({plate!r}, "
        "x.shape[0]) with its other dimensions as events, e.g. "
        "dist.Normal(loc, scale).to_event(1)"
    )
    try:  # in an empty param store, so a stale entry under a name of the pair cannot mislead
        with isolated_run(module, validate=True):
            model_trace, guide_trace = trace_pair(
                module.model, module.guide, example_args, example_kwargs
            )
            foreign = _foreign_params(module, model_trace, guide_trace)
    except KeyError as exc:  # e.g. pyro.param(name) without an initial value, in that store
        raise ConfigError(
            f"running the model and guide of {what} on a batch of {rows} rows "
            f"failed: KeyError {exc} (if that names a pyro.param read without an "
            f"initial value, make the parameter an nn.Parameter of {what}: the "
            "pair must own its parameters)"
        ) from None
    except (ValueError, RuntimeError, TypeError, IndexError) as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(
            f"running the model and guide of {what} on a batch of {rows} rows "
            f"failed: {first_line} ({hint})"
        ) from None
    check_latent_shapes(model_trace, what)
    if foreign:
        raise ConfigError(
            f"the param site(s) {foreign} of {what} are not parameters of the module, so "
            "training (one optimizer over module.parameters()) would never update them: make "
            f"each an nn.Parameter (or a PyroParam, for a constrained one) of {what}, e.g. "
            "self.W = nn.Parameter(init), and use it directly (pyro.module(name, self) "
            "registers all of them with Pyro's param store); or give the model and guide as "
            "two callables, fit(model, guide, data), and the package owns their pyro.param "
            "entries"
        )
    for trace, role in ((model_trace, "model"), (guide_trace, "guide")):
        for name, site in trace.nodes.items():
            if site["type"] != "sample":
                continue
            batch_shape = site["fn"].batch_shape
            plate_dims = {frame.dim for frame in site["cond_indep_stack"] if frame.vectorized}
            free = [
                -i
                for i in range(1, len(batch_shape) + 1)
                if batch_shape[-i] > 1 and -i not in plate_dims
            ]
            if free:
                raise ConfigError(
                    f"the {role}'s site {name!r} of {what} has batch shape "
                    f"{list(batch_shape)}, with dimension(s) {free} in no plate: "
                    f"{hint}"
                )
    plate = find_data_plate(model_trace, guide_trace, data_plate_name(module))
    size = next(
        frame.size
        for trace in (guide_trace, model_trace)
        for site in trace.nodes.values()
        if site["type"] == "sample"
        for frame in site["cond_indep_stack"]
        if frame.name == plate
    )
    if size not in (rows, UNSIZED):  # an unsized plate takes its size from the batch
        raise ConfigError(
            f"the plate {plate!r} of {what} has size {size} but the batch has "
            f"{rows} rows: use pyro.plate({plate!r}, x.shape[0])"
        )
    not_reparam = [
        name
        for name, site in guide_trace.nodes.items()
        if site["type"] == "sample"
        and not site["is_observed"]
        and not site["fn"].has_rsample
        and not is_enumerated(site)
        and not site["fn"].has_enumerate_support
    ]  # discrete: vimco samples it
    if not_reparam:
        raise ConfigError(
            f"the guide's sites {not_reparam} are not reparameterizable; the "
            "estimators need z = g(ε, φ) (e.g. Normal, MultivariateNormal) or a "
            "discrete site with a finite support (summed out when marked for "
            "enumeration, or sampled by vimco)"
        )
    if any(site["type"] == "sample" and site["is_observed"] for site in guide_trace.nodes.values()):
        raise ConfigError(f"the guide of {what} observes a site: observations belong in the model")


def check_latent_shapes(model_trace: Any, what: str) -> None:
    """Refuse, in one line, a latent whose value (the guide's draw, replayed in the model) does
    not fit the shape of the model's distribution at that site: its event dimensions differ,
    or its batch dimensions do not broadcast against the distribution's."""
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"] or not torch.is_tensor(site["value"]):
            continue
        batch, event = tuple(site["fn"].batch_shape), tuple(site["fn"].event_shape)
        shape = tuple(site["value"].shape)
        head = len(shape) - len(event)
        fits = head >= 0 and shape[head:] == event
        try:
            torch.broadcast_shapes(shape[: max(head, 0)], batch)
        except RuntimeError:
            fits = False
        if not fits:
            raise ConfigError(
                f"the latent {name!r} of {what} has shape {list(shape)} in the guide but "
                f"the model's distribution there has shape {list(batch + event)} (batch "
                f"{list(batch)}, event {list(event)}): the model and guide must give each "
                "latent the same shape"
            )


def guide_parameters(module: nn.Module, *args: torch.Tensor) -> list[nn.Parameter]:
    """The parameters the guide's log-density depends on (found by autograd on one trace);
    the others are the model's. Used to report encoder and decoder gradients separately."""
    params = [p for p in module.parameters() if p.requires_grad]
    with poutine.block(), forked_rng():
        guide_trace = poutine.trace(module.guide).get_trace(*args)
    guide_trace.compute_log_prob()
    log_q = sum(
        site["log_prob"].sum()
        for site in guide_trace.nodes.values()
        if site["type"] == "sample" and not site["is_observed"]
    )
    grads = torch.autograd.grad(log_q, params, allow_unused=True)
    return [p for p, g in zip(params, grads) if g is not None]


def _support_text(support: Any) -> str:
    kind = type(support).__name__.lstrip("_")
    low, high = getattr(support, "lower_bound", None), getattr(support, "upper_bound", None)
    named = {
        "Boolean": "{0, 1}",
        "Real": "the real line",
        "Positive": "(0, inf)",
        "Nonnegative": "[0, inf)",
        "NonnegativeInteger": "{0, 1, 2, ...}",
        "IntegerInterval": f"{{{low}, ..., {high}}}",
        "Interval": f"[{low}, {high}]",
        "HalfOpenInterval": f"[{low}, {high})",
        "GreaterThan": f"({low}, inf)",
        "GreaterThanEq": f"[{low}, inf)",
        "LessThan": f"(-inf, {high})",
    }
    return named.get(kind, str(support))


def check_finite_data(*args: Any, **kwargs: Any) -> None:
    """Refuse, in one line, a batch whose floating-point tensors hold NaN or infinite values."""
    for where, value in floating_tensors(args, kwargs):
        if not bool(torch.isfinite(value).all()):
            raise DataError(f"the data's {where} holds NaN or infinite values (in the first batch)")


def check_data(module: Any, *args: Any, **kwargs: Any) -> list[tuple]:
    """Refuse, in one line, a batch whose observed values lie outside the support of their
    site's distribution (pixel values 2.0 for a Bernoulli likelihood), naming the site and the
    first values that fail: the pair is run once on the batch with Pyro's validation on (on a
    fork of the random state, in an empty param store), and each observed site's density
    evaluated at its data, which checks them as ``validate_args`` does (a distribution made
    with ``validate_args=False`` is not checked). Returns the checks of the observed sites
    whose value is one of the batch's own tensors, for :func:`check_batches` to apply to the
    data's other batches without running the pair again."""
    checks = []
    with isolated_run(module, validate=True):
        model_trace, _ = trace_pair(module.model, module.guide, args, kwargs)
        for name, site in model_trace.nodes.items():
            if site["type"] == "sample" and site["is_observed"]:
                try:
                    site["fn"].log_prob(site["value"])
                except ValueError as exc:
                    _refuse_observed(name, site, type(module).__name__, exc)
                checks += _batch_check(name, site, type(module).__name__, args, kwargs)
    return checks


def _batch_check(name: str, site: dict, what: str, args: tuple, kwargs: dict) -> list[tuple]:
    """``[(key, support, where)]`` for an observed site whose value is the batch's argument
    ``key`` (a position or a keyword: the same storage and size) and whose support is checked
    value by value, against the same bounds for every datapoint; ``[]`` else (a Binomial's
    ``total_count`` per datapoint: its first batch alone is checked)."""
    value, base = site["value"], site["fn"]
    support = base.support
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    while hasattr(base, "base_dist"):
        base = base.base_dist
    bounds = [v for v in vars(support).values() if isinstance(v, torch.Tensor)]
    if (
        not isinstance(value, torch.Tensor)
        or support.event_dim != 0
        or not value.numel()
        or any(bound.numel() != 1 for bound in bounds)  # bounds of this batch's datapoints
    ):
        return []
    if getattr(site["fn"], "_validate_args", True) is False:
        return []
    where = f"the {type(base).__name__} likelihood at the observed site {name!r} of {what}"
    for key, arg in [*enumerate(args), *kwargs.items()]:
        if (
            isinstance(arg, torch.Tensor)
            and arg.dim() > 0
            and arg.numel() == value.numel()
            and arg.data_ptr() == value.data_ptr()
        ):
            return [(key, support, where)]
    return []


def check_batches(checks: list[tuple], batches: Any) -> None:
    """Refuse, in one line naming the first failing row (counted over ``batches`` in their
    order), data whose observed values lie outside their site's support: ``checks`` from
    :func:`check_data` on the first batch, applied to each batch's tensors (no model run; on
    a fork of the random state, which a loader draws its seed from)."""
    with forked_rng():
        _check_batches(checks, batches)


def _check_batches(checks: list[tuple], batches: Any) -> None:
    row = 0
    for batch in batches if checks else ():
        for key, support, where in checks:
            value = batch.args[key] if isinstance(key, int) else batch.kwargs[key]
            ok = support.check(value)
            if not bool(ok.all()):
                failing = (~ok).reshape(ok.shape[0], -1).any(1).nonzero()[0, 0]
                bad = value[failing][~ok[failing]].detach().double()
                shown = ", ".join(f"{v:g}" for v in torch.unique(bad).tolist()[:3])
                raise DataError(
                    f"the data hold values {shown} outside {_support_text(support)}, the "
                    f"support of {where} (row {row + int(failing)})"
                )
        row += batch_length(batch.args, batch.kwargs)


def pair_activation_bytes(module: Any, *args: Any, **kwargs: Any) -> int:
    """Bytes of the activations one particle of the pair saves for its gradients on the batch
    ``args``/``kwargs``: measured by running the model and guide once (on a fork of the random
    state, in an empty param store), the parameters left out
    (:func:`pyro_vae.util.memory.saved_bytes`).
    A step of P particles holds about P times as much."""
    from pyro_vae.util.memory import saved_bytes

    def one_particle() -> None:
        model_trace, guide_trace = trace_pair(module.model, module.guide, args, kwargs)
        check_latent_shapes(model_trace, type(module).__name__)
        try:
            (model_trace.log_prob_sum() - guide_trace.log_prob_sum()).sum()
        except (ValueError, RuntimeError, TypeError, IndexError) as exc:
            if usercode.user_frame(exc.__traceback__) is not None:
                raise  # the user's own code failed: named by its file and line
            rows = batch_length(args, kwargs)
            raise ConfigError(
                f"the log-densities of the model and guide of {type(module).__name__} "
                f"failed on a batch of {rows} rows: {usercode.first_line(exc)}"
            ) from None

    with isolated_run(module, validate=False):
        return saved_bytes(one_particle, exclude=list(module.parameters()))


def _refuse_observed(name: str, site: dict, what: str, exc: ValueError) -> None:
    """The one-line refusal of an observed site whose density refused its data: the values
    outside the support when it is checked value by value, else the density's own reason."""
    fn, value = site["fn"], site["value"]
    base = fn
    while hasattr(base, "base_dist"):
        base = base.base_dist
    support = fn.support
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    try:
        ok = support.check(value)
    except (RuntimeError, TypeError, ValueError, NotImplementedError):
        ok = None
    where = f"the {type(base).__name__} likelihood at the observed site {name!r} of {what}"
    if not isinstance(ok, torch.Tensor) or ok.shape != value.shape or bool(ok.all()):
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(f"{where} refuses the data of the first batch: {reason}") from None
    distinct = torch.unique(value[~ok].detach().double()).tolist()
    shown = ", ".join(f"{v:g}" for v in distinct[:3]) + (", ..." if len(distinct) > 3 else "")
    raise DataError(
        f"the data hold values {shown} outside {_support_text(support)}, the "
        f"support of {where} ({int((~ok).sum())} of {ok.numel()} entries of the "
        "first batch)"
    ) from None
