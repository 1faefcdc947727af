"""Checkpoints that are written atomically and fail loudly when they are damaged.

A checkpoint is a plain dict of tensors and Python values (no pickled objects), so
``torch.load(weights_only=True)`` reads it and a checkpoint can never run code.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT = "hvae-checkpoint-v1"


class CheckpointError(RuntimeError):
    """A checkpoint file that is missing, unreadable, truncated or from another program."""


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` via a temporary file and an atomic rename.

    A crash mid-write leaves the previous checkpoint at ``path`` untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint``, with an error that says what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated zip, wrong file type, pickled objects ...
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupt or not an hvae checkpoint "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
            "an earlier checkpoint (e.g. checkpoint_best.pt) may still be intact") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"checkpoint {str(path)!r} has format {found!r}, expected {FORMAT!r}")
    for key in ("config", "model"):
        if key not in state:
            raise CheckpointError(f"checkpoint {str(path)!r} lacks the {key!r} entry")
    return state


def load_model(path: str | os.PathLike, use_ema: bool = True, device: Any = "cpu"):
    """Rebuild the model of a checkpoint in eval mode: ``(model, config)``.

    ``use_ema`` picks the exponential moving average of the weights when the run kept one.
    """
    from hvae.config import Config
    from hvae.model import NVAE

    state = load_checkpoint(path)
    config = Config.from_dict(state["config"])
    model = NVAE(config)
    weights = state["ema"] if use_ema and state.get("ema") is not None else state["model"]
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not match the model its config describes: {err}") from err
    return model.to(device).eval(), config
