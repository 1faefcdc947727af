"""Evaluation of a trained model: importance-weighted NLL, sampling, BatchNorm
re-adjustment, reconstructions, latent export/import and FID.

Library functions only (the command line is ``evaluate.py``).  Every function
takes the device from its arguments or the model and keeps the model in eval
mode, so BatchNorm uses its running statistics.

    nll = iw_log_likelihood(model, build_loader(config, "test"), num_samples=1000, chunk=10)
    images = generate(model, 64, t=0.7, seed=0)
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import sys
import zipfile
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from hvae import objectives
from hvae.errors import HvaeError
from hvae.objectives import bits_per_dim  # noqa: F401  (re-exported: evaluation reports bits/dim)
from hvae.runtime import autocast

Temperature = float | Sequence[float]
DEFAULT_IW_IMAGES = 256  # images per forward pass of the IW estimate when no chunk is given
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


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
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
    distributed = distributed and _distributed()
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
            count += x.shape[0]
            bar.update(x.shape[0])
            bar.set_postfix(nll=f"{nll_sum / count:.3f}")
            if between is not None:
                between()
    if distributed:
        nll_sum, nelbo_sum, count = _all_reduce_sum([nll_sum, nelbo_sum, count], device)
    if count == 0:
        raise EvaluationError("the loader yielded no images")
    dims = model.data_dims
    nll, nelbo = nll_sum / count, nelbo_sum / count
    return dict(nll_nats=nll, nll_bpd=bits_per_dim(nll, dims), nelbo_nats=nelbo,
                nelbo_bpd=bits_per_dim(nelbo, dims), num_images=int(count),
                num_samples=int(num_samples))


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


def _batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
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
    layers = _batchnorms(model)
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


# ------------------------------------------------------------------ FID -----
class FIDWeightsError(HvaeError, FileNotFoundError):
    """The Inception weights file for FID is not given or not there."""


class Moments:
    """Streaming mean and covariance of feature vectors, in float64.

    Sums are taken about the first batch's mean, so the covariance does not
    lose precision to a large common offset; no feature set is held whole.
    """

    def __init__(self):
        self.n, self.shift, self.s1, self.s2 = 0, None, None, None

    def update(self, features: torch.Tensor | np.ndarray) -> None:
        f = np.asarray(torch.as_tensor(features).detach().cpu().double().flatten(1))
        if self.shift is None:
            self.shift = f.mean(0)
            self.s1 = np.zeros(f.shape[1])
            self.s2 = np.zeros((f.shape[1], f.shape[1]))
        f = f - self.shift
        self.n += f.shape[0]
        self.s1 += f.sum(0)
        self.s2 += f.T @ f

    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise EvaluationError("FID needs at least 2 feature vectors")
        d = self.s1 / self.n
        sigma = (self.s2 - self.n * np.outer(d, d)) / (self.n - 1)
        return self.shift + d, (sigma + sigma.T) / 2


def feature_stats(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64) of features [N, D]."""
    m = Moments()
    m.update(features)
    return m.stats()


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) in float64.

    Tr (S1 S2)^(1/2) = Tr (S1^(1/2) S2 S1^(1/2))^(1/2), a symmetric PSD form whose
    eigenvalues are real, so no complex sqrtm residue has to be discarded.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    root1 = _sqrt_psd(s1)
    eig = np.linalg.eigvalsh(root1 @ s2 @ root1)
    tr_cross = np.sqrt(np.clip(eig, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_cross)


@torch.no_grad()
def loader_moments(extractor: FeatureExtractor, loader: Iterable, max_images: int = 0,
                   device: torch.device | str = "cpu", progress: bool = False) -> Moments:
    """Feature moments of (up to ``max_images``) images of a loader."""
    m = Moments()
    bar = tqdm(desc="FID reference", unit="img", disable=not progress, file=sys.stderr)
    for batch in loader:
        x = images_of(batch).to(device)
        if max_images:
            x = x[:max_images - m.n]
        m.update(extractor(x))
        bar.update(x.shape[0])
        if max_images and m.n >= max_images:
            break
    bar.close()
    return m


@torch.no_grad()
def sample_moments(model: nn.Module, extractor: FeatureExtractor, num: int,
                   t: Temperature = 1.0, batch_size: int = 64, seed: int | None = None,
                   progress: bool = False) -> Moments:
    """Feature moments of ``num`` model samples at temperature ``t`` (never stored whole)."""
    m = Moments()
    bar = tqdm(total=num, desc=f"FID samples (t={t})", unit="img", disable=not progress,
               file=sys.stderr)
    with eval_mode(model), seeded(seed, model_device(model)), bar:
        for start in range(0, num, batch_size):
            x = model.sample(min(batch_size, num - start), t)
            m.update(extractor(x.float()))
            bar.update(x.shape[0])
    return m


def reference_stats(extractor: FeatureExtractor, loader_fn: Callable[[], Iterable],
                    cache_path: str | os.PathLike | None, key: dict, max_images: int = 0,
                    device: torch.device | str = "cpu", progress: bool = False
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Training-set feature statistics, read from / written to a .npz cache.

    The cache stores ``key`` (dataset, size, extractor ...) and is only reused
    when the key matches; ``loader_fn`` is called only on a cache miss.
    """
    key_json = json.dumps(key, sort_keys=True)
    if cache_path is not None and Path(cache_path).is_file():
        with np.load(cache_path) as f:
            if str(f["key"]) == key_json:
                return f["mu"], f["sigma"]
    mu, sigma = loader_moments(extractor, loader_fn(), max_images, device, progress).stats()
    if cache_path is not None:
        Path(cache_path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(cache_path).with_suffix(".tmp.npz")
        np.savez(tmp, mu=mu, sigma=sigma, key=np.array(key_json))
        os.replace(tmp, cache_path)
    return mu, sigma


def stats_cache_path(cache_dir: str | os.PathLike, key: dict) -> Path:
    """A file name that changes with every field of ``key``."""
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cache_dir) / f"fid_ref_{key.get('dataset', 'data')}_{digest}.npz"


def fid(model: nn.Module, extractor: FeatureExtractor, ref_stats: tuple[np.ndarray, np.ndarray],
        num: int, t: Temperature = 1.0, batch_size: int = 64, seed: int | None = None,
        progress: bool = False) -> float:
    """FID between ``num`` samples at temperature ``t`` and reference statistics."""
    mu, sigma = sample_moments(model, extractor, num, t, batch_size, seed, progress).stats()
    return frechet_distance(mu, sigma, *ref_stats)


def inception_extractor(weights: str | os.PathLike | None,
                        device: torch.device | str = "cpu") -> FeatureExtractor:
    """pytorch-fid's FID InceptionV3 (2048-d pool features) with weights from a local file.

    No download: pytorch-fid fetches its weights through ``load_state_dict_from_url``;
    that call is redirected to ``torch.load`` of ``weights`` (the file
    pt_inception-2015-12-05-6726825d.pth from pytorch-fid's releases).
    Grey images are repeated to 3 channels; pytorch-fid resizes to 299 itself.
    """
    if not weights:
        raise FIDWeightsError(
            "FID needs the Inception weights as a local file: pass --fid-weights PATH "
            "(pytorch-fid's pt_inception-2015-12-05-6726825d.pth); nothing is downloaded")
    if not Path(weights).is_file():
        raise FIDWeightsError(f"FID Inception weights file {str(weights)!r} does not exist")
    try:
        from pytorch_fid import inception as pf
    except ImportError as err:
        raise EvaluationError("FID needs pytorch-fid: pip install 'hvae[fid]'") from err
    from hvae.runtime import patched

    def local_weights(*_args, **_kwargs):
        return torch.load(weights, map_location="cpu", weights_only=True)

    with patched(pf, "load_state_dict_from_url", local_weights):
        net = pf.InceptionV3([pf.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
    net = net.to(device).eval()

    @torch.no_grad()
    def extract(x: torch.Tensor) -> torch.Tensor:
        x = x.to(device).float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return net(x)[0].flatten(1)

    return extract
