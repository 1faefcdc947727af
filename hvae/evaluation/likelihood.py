"""The importance-weighted log-likelihood and the validation metrics (NELBO, bits/dim).

    nll = iw_log_likelihood(model, build_loader(config, "test"), num_samples=1000, chunk=10)
"""
from __future__ import annotations

import math
import sys
from typing import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from hvae import objectives
from hvae.runtime import autocast
from hvae.evaluation.common import (all_reduce_sum, eval_mode, EvaluationError, images_of,
                                    is_distributed, model_device, seeded)
from hvae.objectives import bits_per_dim


DEFAULT_IW_IMAGES = 256  # images per forward pass of the IW estimate when no chunk is given


# ----------------------------------------------------------------- NLL ------
def log_weights(model: nn.Module, x: torch.Tensor, repeats: int = 1
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass: (log w [B * repeats], single-sample NELBO [B * repeats]) in nats.

    log w = log p(x|z) + log p(z) - log q(z|x) for the z drawn in this pass;
    the NELBO uses the objective's KL terms (analytic when available).  With
    ``repeats`` > 1 every image gets that many latent samples (image-major) and
    the encoder runs once per image.
    """
    out = model(x, repeats=repeats) if repeats > 1 else model(x)
    if repeats > 1:
        x = x.repeat_interleave(repeats, dim=0)
    log_px_z = out.likelihood.log_prob(x).double()
    log_w = log_px_z + sum(p.double() for p in out.log_p) - sum(q.double() for q in out.log_q)
    return log_w, objectives.nelbo(-log_px_z, [k.double() for k in out.kl])


@torch.no_grad()
def iw_log_px(model: nn.Module, x: torch.Tensor, num_samples: int,
              chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Importance-weighted log p(x) [B] and the mean single-sample NELBO [B].

    log p(x) >= logsumexp_k log w_k - log K.  Each forward pass holds at most
    ``chunk`` copies of every image, so memory is bounded whatever K is
    (default: about ``DEFAULT_IW_IMAGES`` images, at least one copy, per forward).
    The NELBO is averaged over the K draws (same expectation, less noise).
    """
    batch = x.shape[0]
    chunk = max(1, min(chunk or DEFAULT_IW_IMAGES // batch, num_samples))
    log_w, nelbo = [], []
    done = 0
    while done < num_samples:
        copies = min(chunk, num_samples - done)
        lw, ne = log_weights(model, x, repeats=copies)  # image-major: [B * copies]
        log_w.append(lw.view(batch, copies))
        nelbo.append(ne.view(batch, copies))
        done += copies
    log_w = torch.cat(log_w, dim=1)
    log_px = torch.logsumexp(log_w, dim=1) - math.log(num_samples)
    return log_px, torch.cat(nelbo, dim=1).mean(dim=1)


@torch.no_grad()
def iw_log_likelihood(model: nn.Module, loader: Iterable, num_samples: int,
                      chunk: int | None = None, device: torch.device | str | None = None,
                      progress: bool = True, max_batches: int = 0,
                      distributed: bool = False, seed: int | None = None,
                      between: Callable[[], None] | None = None) -> dict:
    """Test-set NLL by importance sampling, and the NELBO, in nats and bits/dim.

    With ``distributed`` every rank of the process group must call this with its
    own disjoint shard (``hvae.data.build_loader(..., distributed=True)``); sums and counts are all-reduced,
    so the result is exact over the whole set.  Leave it False when one process
    evaluates alone (e.g. rank 0 at the end of training).  The model is
    evaluated in eval mode and left in the mode it was in.  ``seed`` fixes the
    importance samples without touching the caller's RNG; ``between`` is
    called after each batch (e.g. to stop on a signal).
    """
    device = torch.device(device) if device is not None else model_device(model)
    nll_sum = nelbo_sum = count = 0.0
    nll_sq = nelbo_sq = 0.0  # sums of squares, for the standard errors of the means
    distributed = distributed and is_distributed()
    show = progress and (not distributed or dist.get_rank() == 0)
    bar = tqdm(total=_loader_size(loader, max_batches), unit="img",
               desc=f"IW NLL (K={num_samples})", disable=not show, file=sys.stderr,
               dynamic_ncols=True)
    with eval_mode(model), bar, seeded(seed, device):
        for i, batch in enumerate(loader):
            if max_batches and i >= max_batches:
                break
            x = images_of(batch).to(device, non_blocking=True)
            log_px, nelbo = iw_log_px(model, x, num_samples, chunk)
            nll_sum -= log_px.sum().item()
            nelbo_sum += nelbo.sum().item()
            nll_sq += log_px.double().square().sum().item()
            nelbo_sq += nelbo.double().square().sum().item()
            count += x.shape[0]
            bar.update(x.shape[0])
            bar.set_postfix(nll=f"{nll_sum / count:.3f}")
            if between is not None:
                between()
    if distributed:
        nll_sum, nelbo_sum, count, nll_sq, nelbo_sq = all_reduce_sum(
            [nll_sum, nelbo_sum, count, nll_sq, nelbo_sq], device)
    if count == 0:
        raise EvaluationError("the loader yielded no images")
    dims = model.data_dims
    nll, nelbo = nll_sum / count, nelbo_sum / count
    return dict(nll_nats=nll, nll_bpd=bits_per_dim(nll, dims),
                nll_stderr_nats=_standard_error(nll_sq, nll, count), nelbo_nats=nelbo,
                nelbo_bpd=bits_per_dim(nelbo, dims),
                nelbo_stderr_nats=_standard_error(nelbo_sq, nelbo, count),
                num_images=int(count), num_samples=int(num_samples))


def _standard_error(sum_sq: float, mean: float, count: float) -> float:
    """Standard error of a mean over ``count`` images, from the sum of their squares."""
    if count < 2:
        return float("nan")
    variance = max(sum_sq / count - mean * mean, 0.0) * count / (count - 1)
    return math.sqrt(variance / count)


def _loader_size(loader, max_batches: int = 0) -> int | None:
    """Images the loader will yield (for the progress bar), None when unknown."""
    try:
        size = len(loader.dataset)
        return min(size, max_batches * loader.batch_size) if max_batches else size
    except (AttributeError, TypeError):
        return None


# ------------------------------------------------------- validation ---------
@torch.no_grad()
def test_metrics(model: nn.Module, loader: Iterable, amp: str = "none", max_batches: int = 0,
                 seed: int | None = None, between: Callable[[], None] | None = None) -> dict:
    """Single-sample test NELBO (nats, bits/dim), its parts, per-group KL and active units.

    ``seed`` fixes the posterior samples without touching the caller's RNG;
    ``between`` is called after each batch (e.g. to stop on a signal)."""
    device = model_device(model)
    sums = torch.zeros(3, dtype=torch.float64)          # recon, kl, nelbo
    kl_channels: list[torch.Tensor] | None = None       # per group: [L] summed over the data
    count = 0
    with eval_mode(model), seeded(seed, device):
        for i, batch in enumerate(loader):
            if max_batches and i >= max_batches:
                break
            x = images_of(batch).to(device)
            with autocast(device, amp):
                out = model(x)
            recon = -out.likelihood.log_prob(x).double()
            kl = [k.double() for k in out.kl]
            nelbo = objectives.nelbo(recon, kl)
            sums += torch.stack([recon.sum(), nelbo.sum() - recon.sum(), nelbo.sum()]).cpu()
            count += x.shape[0]
            batch_kl = [k.double().sum(0).cpu() for k in out.kl_per_channel]
            kl_channels = batch_kl if kl_channels is None else [a + b for a, b in zip(kl_channels, batch_kl)]
            if between is not None:
                between()
    if count == 0:
        raise EvaluationError("the loader yielded no images")
    recon, kl, nelbo = (sums / count).tolist()
    units = objectives.active_units([(k / count)[None] for k in kl_channels])
    return {"test_nelbo": nelbo, "test_recon": recon, "test_kl": kl,
            "test_bpd": bits_per_dim(nelbo, model.data_dims),
            "test_kl_groups": [float(k.sum()) / count for k in kl_channels],
            "active_units": [int(u) for u in units], "active_units_total": int(sum(units))}
