"""The extension points a researcher uses: each new part needs one edit in one place.

- a cell kind: derive from ``hvae.model.cells.Region`` and it is compiled by
  ``--compile regional`` and recomputed by ``--activation_checkpointing``;
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

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
