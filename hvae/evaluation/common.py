"""What the evaluation modules share: the device of a model, temperatures, seeded
noise that leaves the training stream alone, eval mode, sums over ranks."""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from hvae.errors import HvaeError



Temperature = float | Sequence[float]
FeatureExtractor = Callable[[torch.Tensor], torch.Tensor]



# ------------------------------------------------------------------ helpers --
class EvaluationError(HvaeError, ValueError):
    """A request that cannot be evaluated (bad latents file, empty data ...)."""


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def parse_temperature(text: str | float | Sequence[float]) -> Temperature:
    """'0.7' -> 0.7; '1,0.9,0.8' -> [1.0, 0.9, 0.8] (one value per latent group).

    Every value must be a finite number >= 0 (``EvaluationError`` otherwise): t scales
    the prior's sigma, so nan gives black images and a negative t is meaningless."""
    def check(value) -> float:
        try:
            t = float(value)
        except (TypeError, ValueError):
            t = math.nan
        if not (math.isfinite(t) and t >= 0):
            where = f" (in {text!r})" if isinstance(text, str) and "," in text else ""
            raise EvaluationError(f"temperature {str(value).strip()!r}{where} is not allowed: "
                                  "a finite number >= 0")
        return t

    if isinstance(text, (int, float)):
        return check(text)
    if not isinstance(text, str):
        return [check(v) for v in text]
    values = [check(v) for v in text.split(",") if v.strip()]
    if not values:
        raise EvaluationError(f"temperature {text!r} has no value")
    return values[0] if len(values) == 1 and "," not in text else values


@contextlib.contextmanager
def seeded(seed: int | None, device: torch.device | str = "cpu"):
    """Run the block with a fixed seed without disturbing the caller's RNG state."""
    if seed is None:
        yield
        return
    device = torch.device(device)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum scalars over all ranks of the process group."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Run the block with the model in eval mode (BatchNorm on its running
    statistics), then restore the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def images_of(batch) -> torch.Tensor:
    """Loaders yield image tensors; tolerate (image, label) pairs too."""
    return batch[0] if isinstance(batch, (list, tuple)) else batch
