"""Samples at a temperature, BatchNorm re-adjustment for them, reconstructions.

    images = generate(model, 64, t=0.7, seed=0)
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from hvae.evaluation.common import eval_mode, model_device, seeded, Temperature


# ------------------------------------------------------------- sampling -----
@torch.no_grad()
def generate(model: nn.Module, num: int, t: Temperature = 1.0, batch_size: int = 64,
             seed: int | None = None) -> torch.Tensor:
    """``num`` samples in [0, 1] on the CPU, drawn in batches at temperature ``t``."""
    images = []
    with eval_mode(model), seeded(seed, model_device(model)):
        for start in range(0, num, batch_size):
            images.append(model.sample(min(batch_size, num - start), t).float().cpu())
    return torch.cat(images) if images else torch.empty(0)


def batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def readjust_bn(model: nn.Module, t: Temperature = 1.0, num_batches: int = 100,
                batch_size: int = 64, inplace: bool = False,
                seed: int | None = None) -> nn.Module:
    """Re-estimate BatchNorm statistics from samples at temperature ``t`` (NVAE paper).

    Why: running statistics gathered on posterior samples do not match prior
    samples at t < 1, which blurs or saturates samples.  Each BN layer that
    sampling actually runs is reset at its first use, then accumulates a
    cumulative average (momentum None) over ``num_batches`` batches of
    ``model.sample(batch_size, t)``.  Layers sampling does not touch (the
    encoder's) keep their statistics.  Works on a copy unless ``inplace``;
    BN momenta and the train/eval mode are restored afterwards.
    """
    model = model if inplace else copy.deepcopy(model)
    layers = batchnorms(model)
    saved = [(bn, bn.momentum) for bn in layers]

    def reset_on_first_use(bn, _inputs):
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
        hooks.pop(bn).remove()

    hooks = {bn: bn.register_forward_pre_hook(reset_on_first_use) for bn in layers}
    try:
        with eval_mode(model), seeded(seed, model_device(model)):
            for _ in range(num_batches):
                model.sample(batch_size, t)
    finally:
        for handle in hooks.values():
            handle.remove()
        for bn, momentum in saved:
            bn.momentum = momentum
    return model




@torch.no_grad()
def reconstruct(model: nn.Module, x: torch.Tensor) -> dict:
    """Posterior-sample reconstructions (the decoder's mean) and their errors.

    Returns ``recons`` [B, C, H, W] in [0, 1], ``mse`` [B] (pixel space [0, 1])
    and ``recon_nats`` [B] = -log p(x|z).
    """
    with eval_mode(model):
        out = model(x)
    recons = out.likelihood.mean().float()
    nats = -out.likelihood.log_prob(x).double()
    mse = (recons - x.float()).pow(2).flatten(1).mean(1)
    return {"recons": recons, "mse": mse, "recon_nats": nats}
