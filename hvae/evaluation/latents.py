"""Latents of a dataset to a file and back, and images decoded from them."""
from __future__ import annotations

import os
import sys
import zipfile
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from hvae.evaluation.common import (eval_mode, EvaluationError, images_of, model_device, seeded,
                                    Temperature)


# ------------------------------------------------------- encode / decode ----
@torch.no_grad()
def encode_dataset(model: nn.Module, loader: Iterable, use_mean: bool = True,
                   max_images: int = 0, progress: bool = False) -> list[np.ndarray]:
    """Per-group latents of every image: one float32 array [N, L, h, w] per group."""
    device = model_device(model)
    groups: list[list[np.ndarray]] = []
    seen = 0
    with eval_mode(model):
        for batch in tqdm(loader, desc="encode", disable=not progress, file=sys.stderr):
            x = images_of(batch).to(device)
            if max_images:
                x = x[:max_images - seen]
            for g, z in enumerate(model.encode(x, use_mean=use_mean)):
                if g == len(groups):
                    groups.append([])
                groups[g].append(z.float().cpu().numpy())
            seen += x.shape[0]
            if max_images and seen >= max_images:
                break
    return [np.concatenate(parts) for parts in groups]


def save_latents(path: str | os.PathLike, latents: Sequence[np.ndarray]) -> str:
    """Write latents as ``group_00``, ``group_01`` ... (top group first)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **{f"group_{g:02d}": z for g, z in enumerate(latents)})
    return str(path)


def load_latents(path: str | os.PathLike,
                 shapes: Sequence[Sequence[int]] | None = None) -> list[np.ndarray]:
    """Read a ``save_latents`` file; the groups must be a prefix group_00..group_{k-1}.

    With ``shapes`` (the model's per-group latent shapes, ``model.latent_shapes``) the
    arrays are checked against the model: at most one per group, each [N, *shape] with
    the same N >= 1 and finite values.  ``EvaluationError`` says what is wrong."""
    if not Path(path).is_file():
        raise EvaluationError(f"latents file {str(path)!r} does not exist")
    if not zipfile.is_zipfile(path):
        raise EvaluationError(f"latents file {str(path)!r} is not an .npz archive (expected "
                              "the file written by --mode encode)")
    try:
        with np.load(path, allow_pickle=False) as f:
            keys = sorted(k for k in f.files if k.startswith("group_"))
            expected = [f"group_{g:02d}" for g in range(len(keys))]
            if not keys or keys != expected:
                raise EvaluationError(f"{path}: expected arrays {expected or ['group_00', '...']} "
                                      f"(a prefix of the groups, top first), found {sorted(f.files)}")
            latents = [f[k] for k in keys]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, AttributeError) as err:
        if isinstance(err, EvaluationError):
            raise
        raise EvaluationError(f"cannot read latents file {str(path)!r}: "
                              f"{str(err).splitlines()[0] if str(err) else type(err).__name__} "
                              "(expected an .npz written by --mode encode)") from None
    if shapes is not None:
        _check_latents(path, latents, shapes)
    return latents


def _check_latents(path, latents: Sequence[np.ndarray], shapes: Sequence[Sequence[int]]) -> None:
    if len(latents) > len(shapes):
        raise EvaluationError(f"{path}: {len(latents)} latent groups, but the model has "
                              f"{len(shapes)}")
    num = latents[0].shape[0] if latents[0].ndim else 0
    for g, (z, shape) in enumerate(zip(latents, shapes)):
        want = [num, *shape]
        if list(z.shape) != want or not np.issubdtype(z.dtype, np.floating):
            raise EvaluationError(f"{path}: group_{g:02d} is {z.dtype} {list(z.shape)}, the "
                                  f"model needs floats of shape {want} ([N, L, h, w], the same "
                                  "N in every group)")
        if not np.isfinite(z).all():
            raise EvaluationError(f"{path}: group_{g:02d} holds non-finite values (nan or inf)")
    if num < 1:
        raise EvaluationError(f"{path}: the latents hold no images (N = 0)")


@torch.no_grad()
def decode_latents(model: nn.Module, latents: Sequence[np.ndarray | torch.Tensor],
                   t: Temperature = 1.0, batch_size: int = 64,
                   seed: int | None = None) -> torch.Tensor:
    """Images in [0, 1] (on the CPU) from given top groups; missing groups are drawn at ``t``."""
    device = model_device(model)
    zs = [torch.as_tensor(np.asarray(z)) for z in latents]
    num = zs[0].shape[0]
    images = []
    with eval_mode(model), seeded(seed, device):
        for start in range(0, num, batch_size):
            part = [z[start:start + batch_size].to(device) for z in zs]
            images.append(model.decode(part, t=t).float().cpu())
    return torch.cat(images)
