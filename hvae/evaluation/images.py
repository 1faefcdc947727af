"""Images as files: uint8 conversion, PNG grids, test inputs spread over a dataset."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from hvae.evaluation.common import images_of


# ------------------------------------------------------- images and files ---
def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[N, C, H, W] floats in [0, 1] -> uint8 array [N, H, W, C] (channels last)."""
    x = images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def save_images(images: torch.Tensor, out_dir: str | os.PathLike, name: str,
                nrow: int = 8) -> dict[str, str]:
    """Write ``name.png`` (a grid) and ``name.npz`` (key ``images``: uint8 N,H,W,C)."""
    from torchvision.utils import save_image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png, npz = out / f"{name}.png", out / f"{name}.npz"
    save_image(images.float().clamp(0, 1), png, nrow=nrow, padding=2)
    np.savez_compressed(npz, images=to_uint8(images))
    return {"png": str(png), "npz": str(npz)}


def evenly_spaced(dataset, n: int) -> torch.Tensor:
    """``n`` images at evenly spaced indices of ``dataset`` (all if it is smaller): a
    spread over a test set stored in class order, not its first class only."""
    count = len(dataset)
    indices = torch.linspace(0, count - 1, min(n, count)).round().long().unique()
    return torch.stack([images_of(dataset[int(i)]) for i in indices])


def interleave_rows(inputs: torch.Tensor, recons: torch.Tensor, nrow: int = 8) -> torch.Tensor:
    """Grid order: a row of ``nrow`` inputs, then the row of their reconstructions, ..."""
    rows = []
    for start in range(0, inputs.shape[0], nrow):
        for part in (inputs[start:start + nrow], recons[start:start + nrow]):
            pad = nrow - part.shape[0]
            rows.append(torch.cat([part, part.new_zeros(pad, *part.shape[1:])]) if pad else part)
    return torch.cat(rows)
