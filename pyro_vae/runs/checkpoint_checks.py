"""A checkpoint read back, checked field by field before use: every field's type, shape and
range, so that a damaged or foreign ``checkpoint.pt`` is refused in one line naming the field
(:class:`~pyro_vae.util.errors.CheckpointError`) rather than failing inside torch."""

from __future__ import annotations

import json
import math
from typing import Any

import torch

from pyro_vae.runs.config import TrainConfig
from pyro_vae.util.errors import CheckpointError

#: the checkpoint field naming the class of a user's model, where one was saved
MODEL_CLASS_KEY = "model_class"


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {list(value.shape)}"
    text = json.dumps(value) if isinstance(value, (str, int, float, bool)) else None
    return text if text is not None and len(text) <= 40 else f"a {type(value).__name__}"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _expect(ok: bool, name: str, wanted: str, value: Any) -> None:
    if not ok:
        raise CheckpointError(f"{name} must be {wanted}, got {_kind(value)}")


def _check_rng(name: str, rng: Any) -> None:
    _expect(
        isinstance(rng, dict) and "torch" in rng and "data" in rng,
        name,
        "a mapping with the 'torch' and 'data' random states",
        rng,
    )
    for key, value in rng.items():
        _expect(
            isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.dim() == 1,
            f"{name}.{key}",
            "a 1-D uint8 tensor",
            value,
        )
    expected = torch.get_rng_state().numel()
    if rng["torch"].numel() != expected:
        raise CheckpointError(
            f"{name}.torch holds {rng['torch'].numel()} bytes, not the "
            f"{expected} of torch's random state"
        )


def _check_history(history: Any) -> None:
    _expect(isinstance(history, dict), "history", "a mapping of per-epoch lists", history)
    for key in ("epoch", "train_loss", "test_elbo", "seconds"):
        _expect(
            isinstance(history.get(key, []), list), f"history.{key}", "a list", history.get(key)
        )
    epochs = history.get("epoch", [])
    count = len(epochs)
    for index, epoch in enumerate(epochs):
        _expect(
            _is_whole(epoch) and epoch == index + 1,
            f"history.epoch[{index}]",
            f"{index + 1} (epochs count 1, 2, ...)",
            epoch,
        )
    for key, length in (("train_loss", count), ("seconds", count), ("test_elbo", None)):
        values = history.get(key, [])
        if length is not None and len(values) != length or length is None and len(values) > count:
            raise CheckpointError(f"history.{key} holds {len(values)} values for {count} epochs")
        for index, value in enumerate(values):
            _expect(_is_number(value), f"history.{key}[{index}]", "a number", value)
    for index, value in enumerate(history.get("train_loss", [])):
        _expect(math.isfinite(value), f"history.train_loss[{index}]", "a finite number", value)
    for index, value in enumerate(history.get("seconds", [])):
        _expect(
            math.isfinite(value) and value >= 0, f"history.seconds[{index}]", "a number >= 0", value
        )
    if "final" in history:
        _expect(isinstance(history["final"], dict), "history.final", "a mapping", history["final"])
    estimates = history.get("estimates", [])
    _expect(isinstance(estimates, list), "history.estimates", "a list", estimates)
    for index, entry in enumerate(estimates):
        _expect(
            isinstance(entry, dict) and _is_whole(entry.get("epoch")) and entry["epoch"] >= 0,
            f"history.estimates[{index}]",
            "a mapping with its epoch (a whole number >= 0)",
            entry,
        )


def _check_optimizer(optimizer: Any) -> None:
    _expect(
        isinstance(optimizer, dict)
        and isinstance(optimizer.get("state"), dict)
        and isinstance(optimizer.get("param_groups"), list),
        "optimizer",
        "an optimizer state (a mapping with 'state' and 'param_groups')",
        optimizer,
    )
    for key, value in optimizer["state"].items():
        _expect(isinstance(value, dict), f"optimizer.state[{key!r}]", "a mapping", value)
        for name, item in value.items():
            _expect(  # None: e.g. SGD's momentum buffer without momentum
                item is None or isinstance(item, torch.Tensor) or _is_number(item),
                f"optimizer.state[{key!r}].{name}",
                "a tensor, a number or null",
                item,
            )
    for index, group in enumerate(optimizer["param_groups"]):
        name = f"optimizer.param_groups[{index}]"
        _expect(isinstance(group, dict), name, "a mapping", group)
        params = group.get("params")
        _expect(
            isinstance(params, list) and all(_is_whole(p) for p in params),
            f"{name}.params",
            "a list of whole numbers",
            params,
        )
        for key in ("lr", "eps", "weight_decay"):
            # eps may be a pair (Adafactor's): a number is checked, as lr always is
            if key in group and (key == "lr" or _is_number(group[key])):
                value = group[key]
                _expect(
                    _is_number(value) and math.isfinite(value) and value >= 0,
                    f"{name}.{key}",
                    "a finite number >= 0",
                    value,
                )
        if "betas" in group:
            betas = group["betas"]
            _expect(
                isinstance(betas, (list, tuple))
                and len(betas) == 2
                and all(_is_number(b) and 0 <= b < 1 for b in betas),
                f"{name}.betas",
                "two numbers in [0, 1)",
                betas,
            )


def check_checkpoint(state: dict[str, Any]) -> None:
    """Check every field of a checkpoint by type and range; a
    :class:`~pyro_vae.util.errors.CheckpointError` names the first field that fails."""
    model = state["model"]
    _expect(
        isinstance(model, dict) and all(isinstance(k, str) for k in model),
        "model",
        "a mapping of parameter names to tensors",
        model,
    )
    for key, value in model.items():
        _expect(isinstance(value, torch.Tensor), f"model[{key!r}]", "a tensor", value)
    _check_optimizer(state["optimizer"])
    _check_rng("rng", state["rng"])
    if "scheduler" in state:
        _expect(isinstance(state["scheduler"], dict), "scheduler", "a mapping", state["scheduler"])
    _check_history(state["history"])
    _expect(isinstance(state["config"], dict), "config", "a mapping", state["config"])
    try:
        TrainConfig.from_dict(state["config"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"config: {exc}") from None
    if MODEL_CLASS_KEY in state:
        _expect(
            isinstance(state[MODEL_CLASS_KEY], str),
            MODEL_CLASS_KEY,
            "a string",
            state[MODEL_CLASS_KEY],
        )
    if "distributed" in state:
        ranks = state["distributed"]
        _expect(isinstance(ranks, dict), "distributed", "a mapping", ranks)
        world = ranks.get("world_size")
        _expect(
            _is_whole(world) and world >= 2, "distributed.world_size", "a whole number >= 2", world
        )
        _expect(
            isinstance(ranks.get("rng"), list) and len(ranks["rng"]) == world,
            "distributed.rng",
            f"a list of {world} random states",
            ranks.get("rng"),
        )
        for rank, rng in enumerate(ranks["rng"]):
            _check_rng(f"distributed.rng[{rank}]", rng)
        order = ranks.get("order")
        _expect(
            isinstance(order, torch.Tensor) and order.dtype == torch.uint8,
            "distributed.order",
            "a uint8 tensor",
            order,
        )
