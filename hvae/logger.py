"""Metrics to TensorBoard and ``metrics.jsonl`` (rank 0 only).

The training step hands over device tensors; ``to_host`` reads them, and is the
loop's one deliberate host sync, called on logging steps only (cf. nanoGPT).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch


def to_host(metrics: dict[str, Any]) -> dict[str, Any]:
    """Tensors -> floats (0-d) or lists of floats; other values unchanged.

    The tensors are concatenated and copied in one transfer, not read one by one.
    """
    keys = [k for k, v in metrics.items() if torch.is_tensor(v)]
    out = dict(metrics)
    if not keys:
        return out
    flat = torch.cat([metrics[k].detach().float().reshape(-1) for k in keys]).cpu()
    for key, part in zip(keys, flat.split([metrics[k].numel() for k in keys])):
        out[key] = part.item() if metrics[key].dim() == 0 else part.tolist()
    return out


class MetricsLogger:
    """Writes scalars, per-group lists and images of one run; a no-op where not ``enabled``."""

    def __init__(self, run_dir: str | Path, enabled: bool = True):
        self.run_dir, self.enabled = Path(run_dir), enabled
        self.writer = None

    def _tensorboard(self):
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        return self.writer

    def log(self, metrics: dict[str, Any], step: int, epoch: int, split: str = "train"
            ) -> dict[str, Any]:
        """Log ``metrics`` (device tensors allowed: this reads them) and return the host values."""
        values = to_host(metrics)  # HOST SYNC: on logging steps only
        if not self.enabled:
            return values
        writer = self._tensorboard()
        for key, value in values.items():
            if isinstance(value, list):
                for i, v in enumerate(value):
                    writer.add_scalar(f"{split}/{key}/group_{i:02d}", v, step)
            elif isinstance(value, (int, float)):  # bools too
                writer.add_scalar(f"{split}/{key}", float(value), step)
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"split": split, "step": step, "epoch": epoch,
                                "time": time.time(), **values}) + "\n")
        return values

    def add_image(self, tag: str, grid: torch.Tensor, step: int) -> None:
        if self.enabled:
            self._tensorboard().add_image(tag, grid, step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
