"""FID: Inception features (pytorch-fid's network, weights from a local file), their
moments, the Frechet distance, and cached reference statistics."""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from hvae.errors import HvaeError
from hvae.evaluation.common import (eval_mode, EvaluationError, FeatureExtractor, images_of,
                                    model_device, seeded, Temperature)


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
