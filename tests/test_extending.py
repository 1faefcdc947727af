"""The extension points a researcher uses: each new part needs one edit in one place.

- a cell kind: derive from ``hvae.model.cells.Region`` and it is compiled by
  ``--compile regional`` and recomputed by ``--activation_checkpointing``;
- a loss term: an entry of ``Loss.per_image`` (or ``Loss.summary``) in
  ``hvae.objectives.compute_loss`` reaches the loss, micro-batch accumulation and the
  logged metrics;
- a dataset: one ``hvae.data.register_dataset`` call.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from hvae import objectives
from hvae.config import preset
from hvae.runtime import Runtime
from hvae.training import Trainer

from hvae.model import compile as compile_module
from hvae.model.cells import Region
from hvae.model.compile import compile_model, regions
from hvae.model.remat import enable_activation_checkpointing


class ToyCell(Region):
    """A cell no fast-path module knows by name."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.inner = nn.Linear(width, width)
        self.outer = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.1 * self.outer(torch.tanh(self.inner(x)))


def saved_tensor_count(model: nn.Module, x: torch.Tensor) -> int:
    """Tensors autograd keeps for backward after one forward."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        model(x).sum()
    return len(saved)


def test_a_new_cell_kind_is_compiled_and_recomputed_without_naming_it(monkeypatch):
    monkeypatch.setattr(compile_module, "_compiled", {})
    torch.manual_seed(0)
    plain = nn.Sequential(ToyCell(), nn.ReLU(), ToyCell())
    fast = copy.deepcopy(plain)
    assert regions(fast) == [fast[0], fast[2]]
    compile_model(fast, "regional", backend="aot_eager")
    assert (ToyCell.forward, "aot_eager") in compile_module._compiled  # one per class
    enable_activation_checkpointing(fast)
    assert all(getattr(cell, "_inner_forward", None) is not None for cell in (fast[0], fast[2]))
    x = torch.randn(4, 8, requires_grad=True)
    assert saved_tensor_count(fast, x) < saved_tensor_count(plain, x)  # recomputed in backward
    for model in (plain, fast):
        model(x).square().sum().backward()
    for p, q in zip(plain.parameters(), fast.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-6)


def test_a_new_loss_term_reaches_the_loss_and_the_logged_metrics(tmp_path, monkeypatch):
    """The one edit: compute_loss adds a per-image term to its objective and to
    ``per_image`` (done here by wrapping it).  Training with 2 micro-batches per step
    then back-propagates it and logs it, with no change to the step or the logger."""
    from test_training import TINY, bernoulli_batch
    real = objectives.compute_loss

    def with_top_penalty(recon, kl_groups, **kwargs):
        loss = real(recon, kl_groups, **kwargs)
        penalty = 0.5 * objectives._stack_groups(kl_groups)[:, 0]  # [B]: the top group's KL
        loss.loss = loss.loss + penalty.mean()
        loss.per_image["top_penalty"] = penalty.detach()
        return loss

    monkeypatch.setattr(objectives, "compute_loss", with_top_penalty)
    images = torch.cat([bernoulli_batch(16, seed=i) for i in range(4)])
    loader = torch.utils.data.DataLoader(images, batch_size=8, drop_last=True)
    cfg = preset("demo", out=str(tmp_path / "runs"), **{**TINY, "batch_size": 8,
                                                          "grad_accum_steps": 2, "max_steps": 2})
    trainer = Trainer(cfg, Runtime(), progress=False, loaders=(loader, loader))
    trainer.fit()
    rows = [json.loads(line) for line in
            (Path(cfg.out) / cfg.run_name / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"]
    assert len(train_rows) == 2
    for r in train_rows:
        assert r["top_penalty"] > 0
        assert r["loss"] == pytest.approx(r["recon"] + r["kl_term"] + r["top_penalty"] + r["reg"],
                                          rel=1e-4)


def test_a_new_dataset_is_one_registration(tmp_path, monkeypatch):
    """``register_dataset`` names the reader, what --data holds with how to get it, and
    the flip rule; the config then accepts the name and the loader serves its images."""
    import numpy as np

    from hvae import data

    monkeypatch.setattr(data, "DATASETS", dict(data.DATASETS))  # the registry, restored after

    def read_stripes(config, split):
        """Vertical stripes, one image per column offset, from a .npy file in --data."""
        path = Path(config.data) / f"{split}.npy"
        if not path.is_file():
            raise data._missing(config, Path(config.data), f"no {path.name}")
        return np.load(path), None

    data.register_dataset("stripes", read_stripes, expected="DIR/train.npy and DIR/test.npy",
                          how_to_get="python make_stripes.py DIR", flip=True)
    images = np.zeros((8, 1, 8, 8), np.uint8)  # [N, C, H, W]
    for i in range(8):
        images[i, 0, :, i] = 255  # column i lit
    for split in ("train", "test"):
        np.save(tmp_path / f"{split}.npy", images)
    cfg = preset("demo", dataset="stripes", data=str(tmp_path), image_size=8, batch_size=4,
                 num_latent_scales=1, num_preprocess_blocks=1, num_postprocess_blocks=1)
    train_set = data.build_dataset(cfg, "train")
    test_set = data.build_dataset(cfg, "test")
    assert len(train_set) == 8 and train_set.flip and not test_set.flip
    assert torch.equal(test_set[3][0, :, 3], torch.ones(8))
    lit = [int(train_set[3][0, 0].argmax()) for _ in range(40)]
    assert set(lit) == {3, 4}  # the flip rule: column 3, or 7 - 3 mirrored
    batch = next(iter(data.build_loader(cfg, "train")))
    assert batch.shape == (4, 1, 8, 8)
    with pytest.raises(data.DataError, match="expected .*train.npy.*To get it: python make_stripes.py"):
        data.build_dataset(cfg.replace(data=str(tmp_path / "empty")), "train")
