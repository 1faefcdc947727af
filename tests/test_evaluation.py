"""Evaluation: importance-weighted NLL, sampling, BN re-adjustment, FID, CLI.

A tiny NVAE is trained for a few dozen Adam steps on the bundled MNIST subset
(module fixture); the estimator maths is also checked on a linear-Gaussian toy
model whose log p(x) is known in closed form.
"""
from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # evaluate.py lives at the repo root

import evaluate as cli  # noqa: E402
from hvae import evaluation as ev  # noqa: E402
from hvae.evaluation.sampling import batchnorms  # noqa: E402
from hvae.checkpoint import load_model, save_checkpoint  # noqa: E402
from hvae.config import preset  # noqa: E402
from hvae.data import build_loader  # noqa: E402
from hvae.distributions import Normal  # noqa: E402
from latent_probes import (combiner_latents, normal_log_density, per_image,  # noqa: E402
                           perturb_flows, priors_given, record_inputs, standardised)

torch.set_num_threads(2)


# ---------------------------------------------------------------- fixtures --
def tiny_config(**overrides):
    """A narrow demo that pads the digits to 32x32 (so bits/dim tests see padding)."""
    return preset("demo", **{**dict(num_channels_enc=8, num_channels_dec=8, num_groups_per_scale=2,
                                    num_latent_per_group=4, num_preprocess_cells=1,
                                    num_postprocess_cells=1, batch_size=32, ema_decay=0.0,
                                    pad_input=2), **overrides})


STEPS = 30


@pytest.fixture(scope="module")
def trained():
    """(model in eval mode, config, test images [64, 1, 28, 28]) after a short Adam run."""
    from hvae.data import build_loader
    from hvae.model import NVAE

    torch.manual_seed(0)
    config = tiny_config()
    model = NVAE(config)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    step = 0
    while step < STEPS:
        for x in build_loader(config, "train", batch_size=32):
            out = model(x)
            loss = (-out.likelihood.log_prob(x) + sum(out.kl)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step == STEPS:
                break
    model.eval()
    x_test = torch.cat([b for _, b in zip(range(2), build_loader(config, "test", batch_size=32))])
    return model, config, x_test


@pytest.fixture(scope="module")
def checkpoint(trained, tmp_path_factory):
    model, config, _ = trained
    path = tmp_path_factory.mktemp("run") / "checkpoint.pt"
    save_checkpoint(path, {"config": config.to_dict(), "model": model.state_dict(), "ema": None,
                           "optimizer": None, "scheduler": None, "scaler": None,
                           "spectral": None, "rng": None, "step": STEPS, "epoch": 0,
                           "data_position": 0, "best": None, "metrics": {}})
    return path


# --------------------------------------------- toy model with exact log p(x) --
@dataclass
class _Out:
    likelihood: object
    kl: list
    log_q: list
    log_p: list


class _GaussLik:
    def __init__(self, mean, log_s):
        self.d = Normal(mean, log_s.expand_as(mean))

    def log_prob(self, x):
        return self.d.log_prob(x.flatten(1)).sum(1)


class LinearGaussian(nn.Module):
    """z ~ N(0, I), x | z ~ N(W z + b, s^2 I), q(z|x) = N(A x, sq^2) (deliberately off)."""

    def __init__(self, dx=6, dz=2):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.W = nn.Parameter(torch.randn(dx, dz, generator=g))
        self.b = nn.Parameter(torch.randn(dx, generator=g) * 0.3)
        self.log_s = nn.Parameter(torch.tensor(-0.5))
        with torch.no_grad():  # the exact posterior, then a slightly wrong q
            s2 = torch.exp(2 * self.log_s)
            cov = torch.linalg.inv(torch.eye(dz) + self.W.T @ self.W / s2)
            self.A = nn.Parameter(0.9 * cov @ self.W.T / s2)
            self.log_sq = nn.Parameter(torch.log(1.3 * cov.diagonal().sqrt()))
        self.data_dims = dx

    def forward(self, x, repeats=1):
        x = x.flatten(1).repeat_interleave(repeats, dim=0)
        q = Normal((x - self.b) @ self.A.T, self.log_sq.expand(x.shape[0], -1))
        p = Normal(torch.zeros_like(q.mu), torch.zeros_like(q.mu))
        z = q.sample()
        lik = _GaussLik(z @ self.W.T + self.b, self.log_s)
        return _Out(lik, [q.kl(p).sum(1)], [q.log_prob(z).sum(1)], [p.log_prob(z).sum(1)])

    def exact_log_px(self, x):
        cov = self.W @ self.W.T + torch.exp(2 * self.log_s) * torch.eye(self.data_dims)
        return torch.distributions.MultivariateNormal(self.b, cov).log_prob(x.flatten(1))

    def exact_elbo(self, x):
        """E_q[log p(x|z)] - KL(q || N(0, I)) in closed form (float64)."""
        x = x.flatten(1).double()
        W, b, A = self.W.double(), self.b.double(), self.A.double()
        s2, sq2 = torch.exp(2 * self.log_s.double()), torch.exp(2 * self.log_sq.double())
        m = (x - b) @ A.T
        sq_err = ((x - m @ W.T - b) ** 2).sum(1) + (sq2 * (W ** 2).sum(0)).sum()
        expected_log_lik = -0.5 * self.data_dims * torch.log(2 * math.pi * s2) - sq_err / (2 * s2)
        kl = 0.5 * (sq2 + m ** 2 - 1 - torch.log(sq2)).sum(1)
        return expected_log_lik - kl


@torch.no_grad()
def test_iw_converges_to_exact_log_likelihood_on_linear_gaussian():
    torch.manual_seed(0)
    model = LinearGaussian().eval()
    x = torch.randn(5, 6)
    exact = model.exact_log_px(x).double()
    iw, nelbo = ev.iw_log_px(model, x, num_samples=4000, chunk=500)
    assert torch.all(-nelbo < exact - 0.05), "the toy posterior should leave an ELBO gap"
    assert torch.allclose(iw, exact, atol=0.03)


@torch.no_grad()
def test_iw_approaches_exact_from_below_as_k_grows_on_linear_gaussian():
    """ELBO <= E[IW_K] <= log p(x), E[IW_K] non-decreasing in K and -> log p(x); the
    NELBO returned with it is the mean over the K draws, so it estimates -ELBO for every K.

    E[IW_K] is estimated from R independent K-sample estimates per image; every
    comparison allows 4 standard errors of those means (computed from the R
    replicates), plus 1e-3 for float rounding.
    """
    torch.manual_seed(4)
    model = LinearGaussian().eval()
    x = torch.randn(4, 6)
    exact, elbo = model.exact_log_px(x).double(), model.exact_elbo(x)
    gap = exact - elbo
    assert torch.all(gap > 0.05), "the toy posterior should leave an ELBO gap"
    reps = 200
    xr = x.repeat_interleave(reps, 0)
    means, ses = [], []
    for k in (1, 8, 64, 512):
        with ev.seeded(k):
            iw, nelbo = ev.iw_log_px(model, xr, num_samples=k, chunk=k)
        iw, nelbo = iw.view(4, reps), nelbo.view(4, reps)
        se = iw.std(1) / math.sqrt(reps)
        means.append(iw.mean(1))
        ses.append(se)
        below = exact - iw.mean(1)                                    # >= 0 up to noise
        assert torch.all(below > -4 * se - 1e-3), (k, below, se)
        assert torch.all(below < gap + 4 * se + 1e-3), (k, below, gap)  # never below the ELBO
        nelbo_se = nelbo.std(1) / math.sqrt(reps)
        assert torch.all((nelbo.mean(1) + elbo).abs() < 4 * nelbo_se + 1e-3), (k, nelbo.mean(1), elbo)
        if k == 1:  # one sample: E[log w] is the ELBO itself
            assert torch.all((means[0] - elbo).abs() < 4 * se + 1e-3)
    for k in range(1, len(means)):  # non-decreasing in K
        allowed = 4 * torch.sqrt(ses[k] ** 2 + ses[k - 1] ** 2) + 1e-3
        assert torch.all(means[k] > means[k - 1] - allowed), (k, means)
    # K = 512 closes nearly all of the gap: its bias is ~ Var(w) / (2 K p(x)^2)
    assert torch.all(exact - means[-1] < 0.05 * gap + 4 * ses[-1] + 1e-3), (exact - means[-1], gap)
    assert torch.all(means[1] - means[0] > 0.2 * gap), "K = 8 should already close part of the gap"


@torch.no_grad()
def test_k1_equals_negative_nelbo_in_expectation_on_linear_gaussian():
    torch.manual_seed(1)
    model = LinearGaussian().eval()
    x = torch.randn(3, 6).repeat_interleave(4000, 0)
    log_w, nelbo = ev.iw_log_px(model, x, num_samples=1)
    diff = (-log_w - nelbo).view(3, -1)
    se = diff.std(1) / math.sqrt(diff.shape[1])
    assert torch.all(diff.mean(1).abs() < 4 * se + 1e-3)


# ---------------------------------------------------- IW NLL on the NVAE ----
def test_k1_log_weight_is_minus_single_sample_bound_with_same_noise(trained):
    model, _, x = trained
    x = x[:8]
    with torch.no_grad(), ev.seeded(5):
        out = model(x)
    # Independently from the model's own log q / log p / KL bookkeeping (no flows here).
    log_pz = sum(per_image(normal_log_density(z, m, s))
                 for z, m, s in zip(out.z, out.p_mu, out.p_log_sigma))
    log_qz = sum(per_image(normal_log_density(z, m, s))
                 for z, m, s in zip(out.z, out.q_mu, out.q_log_sigma))
    manual = out.likelihood.log_prob(x).double() + log_pz - log_qz
    nelbo = -out.likelihood.log_prob(x).double() + sum(
        per_image(Normal(mq, sq).kl(Normal(mp, sp))).double()
        for mq, sq, mp, sp in zip(out.q_mu, out.q_log_sigma, out.p_mu, out.p_log_sigma))
    with ev.seeded(5):
        log_px, iw_nelbo = ev.iw_log_px(model, x, num_samples=1)
    assert torch.allclose(log_px, manual, atol=1e-4)
    assert torch.allclose(iw_nelbo, nelbo, atol=1e-4)


def test_mc_kl_matches_analytic_kl_and_log_weights_match_distributions(trained):
    """sum_g (log q - log p) averages to the analytic KL, so -log w averages to the NELBO."""
    model, _, x = trained
    xs = x[:2].repeat_interleave(150, 0)
    with ev.seeded(6):
        log_w, nelbo = ev.iw_log_px(model, xs, num_samples=1)
    diff = (-log_w - nelbo).view(2, -1)
    se = diff.std(1) / math.sqrt(diff.shape[1])
    assert torch.all(diff.mean(1).abs() < 4 * se + 1e-2), (diff.mean(1), se)


def test_iw_bound_not_below_elbo(trained):
    model, _, x = trained
    x = x[:8]
    with ev.seeded(8):
        reps = [ev.iw_log_px(model, x, num_samples=16, chunk=16) for _ in range(2)]
    iw = torch.stack([r[0] for r in reps]).mean(0)
    elbo = -torch.stack([r[1] for r in reps]).mean(0)
    assert torch.all(iw >= elbo - 0.05), (iw - elbo)
    assert (iw - elbo).mean() > 0


@torch.no_grad()
def test_chunking_does_not_change_the_estimate():
    """Same K, different chunk sizes: the same estimate up to Monte-Carlo error."""
    torch.manual_seed(2)
    model = LinearGaussian().eval()
    x = torch.randn(4, 6)
    exact = model.exact_log_px(x).double()
    for chunk in (1, 7, 1000):  # 7 does not divide K: a short last chunk
        with ev.seeded(chunk):
            iw, _ = ev.iw_log_px(model, x, num_samples=1000, chunk=chunk)
        assert torch.allclose(iw, exact, atol=0.05), chunk


class _PosteriorMeans(nn.Module):
    """The model with z = posterior mean: noise-free log weights, to check bookkeeping."""

    def __init__(self, model):
        super().__init__()
        self.model, self.data_dims = model, model.data_dims

    def forward(self, x, repeats=1):
        return self.model(x, use_mean=True, repeats=repeats)


def test_chunks_keep_each_image_with_its_own_weights(trained):
    """With z fixed at the posterior means all K log weights (and NELBOs) of an image are
    equal, so the K-sample estimate must equal the single-pass one for every chunking,
    and the NELBO reported with it (the mean over the K draws) the single-pass NELBO,
    computed here from the model's output directly."""
    model, _, x = trained
    x = x[:4]
    fixed = _PosteriorMeans(model).eval()
    with torch.no_grad():
        log_w, _ = ev.log_weights(fixed, x)
        out = fixed(x)
    nelbo = -out.likelihood.log_prob(x).double() + sum(k.double() for k in out.kl)
    assert log_w.unique().numel() == 4
    for chunk in (1, 4, 6):  # 4 does not divide K = 6
        log_px, iw_nelbo = ev.iw_log_px(fixed, x, num_samples=6, chunk=chunk)
        assert torch.allclose(log_px, log_w, atol=1e-5, rtol=0), chunk
        assert torch.allclose(iw_nelbo, nelbo, atol=1e-4, rtol=1e-6), (chunk, iw_nelbo, nelbo)
    res = ev.iw_log_likelihood(fixed, [x], num_samples=6, chunk=4, progress=False)
    assert res["nelbo_nats"] == pytest.approx(nelbo.mean().item(), rel=1e-6)
    assert res["nll_nats"] == pytest.approx(-log_w.mean().item(), rel=1e-6)
    # the standard errors of the two means over the images
    n = log_w.numel()
    assert res["nll_stderr_nats"] == pytest.approx(log_w.std().item() / n ** 0.5, rel=1e-5)
    assert res["nelbo_stderr_nats"] == pytest.approx(nelbo.std().item() / n ** 0.5, rel=1e-4)


def _scalar_latent_flow_model():
    """Two groups of ONE latent value each (1 channel at 1x1), one IAF pair per group,
    4x4 binary images: log p(x) is a 2-d integral that quadrature gets exactly.
    The flows are perturbed away from their near-identity start.  Affine flows:
    their log-det is not 0, so a mishandled log-det shows (NVAE's shift cell on
    one scalar is a constant shift)."""
    from hvae.model import NVAE

    torch.manual_seed(0)
    model = NVAE(preset("demo", image_size=4, pad_input=0, num_latent_scales=1,
                        num_groups_per_scale=2, num_latent_per_group=1,
                        num_preprocess_blocks=2, num_postprocess_blocks=2,
                        num_preprocess_cells=1, num_postprocess_cells=1,
                        num_channels_enc=8, num_channels_dec=8, num_nf=1, flow_type="affine",
                        dec_cell_expand=6, post_cell_expand=3))  # the widths the tolerance was sized on
    return perturb_flows(model, seed=1)


@torch.no_grad()
def _quadrature_log_px(model, x, nodes):
    """log p(x) = log E_{z0 ~ p} E_{z1 ~ p(.|z0)} p(x | z0, z1) by Gauss-Hermite quadrature
    (``nodes`` points per latent): priors from forward passes fed the node latents,
    p(x|z) from decode(..., output="mean") (the Bernoulli pixel probabilities)."""
    u, w = np.polynomial.hermite_e.hermegauss(nodes)     # weight exp(-u^2 / 2)
    u, log_w = torch.tensor(u), torch.tensor(np.log(w / math.sqrt(2 * math.pi)))
    n = nodes
    # top group: its prior (the same for every image) from any forward pass
    mu0, ls0 = priors_given(model, [torch.zeros(1, 1, 1, 1)] * 2)
    z0 = mu0[0].double().flatten() + torch.exp(ls0[0].double().flatten()) * u    # [n]
    mu1, ls1 = priors_given(model, [z0.float().view(n, 1, 1, 1)] * 2)
    z1 = mu1[1].double().view(n, 1) + torch.exp(ls1[1].double().view(n, 1)) * u  # [n, n]
    probs = model.decode([z0.repeat_interleave(n).float().view(-1, 1, 1, 1),
                          z1.reshape(-1).float().view(-1, 1, 1, 1)], output="mean").double()
    xs = x.double().flatten(1)[:, None]                                           # [B, 1, D]
    p = probs.flatten(1)[None]                                                    # [1, n*n, D]
    log_px_z = (xs * torch.log(p) + (1 - xs) * torch.log1p(-p)).sum(2)          # [B, n*n]
    log_quad = (log_w[:, None] + log_w[None, :]).reshape(-1)
    return torch.logsumexp(log_px_z + log_quad, dim=1)


def test_iw_with_flows_matches_log_likelihood_by_quadrature():
    """The importance-weighted estimate of a model with flows converges to log p(x), which
    depends only on the prior and the decoder; here log p(x) is computed without the
    encoder or the flows at all, by quadrature over the two scalar latents.

    Tolerance: the K-sample estimate has standard error ~ sd(w) / (mean(w) sqrt(K))
    (delta method) and bias ~ its square / 2; both are estimated from an independent
    set of log weights, and the test allows 4 standard errors plus the bias.  The
    quadrature itself is checked by agreement of 24 and 32 nodes.  A flow log-det with
    the wrong sign (dropped) shifts every log w by twice (once) the summed log-det,
    about 4 (2) nats here, against a tolerance of about 0.15.
    """
    model = _scalar_latent_flow_model()
    g = torch.Generator().manual_seed(2)
    x = (torch.rand(4, 1, 4, 4, generator=g) > 0.5).float()
    exact = _quadrature_log_px(model, x, 32)
    assert torch.allclose(exact, _quadrature_log_px(model, x, 24), atol=1e-6, rtol=0)
    k = 3000
    with ev.seeded(0):
        iw, _ = ev.iw_log_px(model, x, num_samples=k, chunk=1000)
    with torch.no_grad(), ev.seeded(1):
        log_w, _ = ev.log_weights(model, x, repeats=1000)
    w = torch.exp(log_w.view(4, -1) - log_w.view(4, -1).max(1, keepdim=True).values)
    se = w.std(1) / w.mean(1) / math.sqrt(k)
    assert torch.all(se < 0.05), se  # the check below is tight enough to mean something
    assert torch.all((iw - exact).abs() < 4 * se + se ** 2 + 1e-3), (iw, exact, se)


def test_bits_per_dim_counts_unpadded_mnist_pixels(trained):
    model, config, x = trained
    assert config.padded_size == 32 and model.data_dims == 784
    loader = torch.utils.data.DataLoader(x[:20], batch_size=8)
    res = ev.iw_log_likelihood(model, loader, num_samples=4, chunk=2, progress=False)
    assert res["num_images"] == 20 and res["num_samples"] == 4
    assert res["nll_bpd"] == pytest.approx(res["nll_nats"] / (784 * math.log(2)))
    assert res["nelbo_bpd"] == pytest.approx(res["nelbo_nats"] / (784 * math.log(2)))
    assert not model.training
    assert ev.bits_per_dim(784 * math.log(2), 784) == pytest.approx(1.0)


def test_shards_cover_every_test_example_exactly_once():
    config = tiny_config()
    seen = []
    for rank in range(3):
        loader = build_loader(config, "test", distributed=True, rank=rank, world_size=3,
                              batch_size=7, max_images=50)
        seen += list(loader.sampler)
        assert sum(len(x) for x in loader) == len(loader.sampler)  # nothing padded or dropped
    assert sorted(seen) == list(range(50))


class _Deterministic(nn.Module):
    """log w = -sum(x): the distributed result must equal the plain mean exactly."""
    data_dims = 784

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x, repeats=1):
        zero = torch.zeros(x.shape[0] * repeats)
        lik = type("L", (), {"log_prob": staticmethod(lambda v: -v.flatten(1).sum(1))})
        return _Out(lik, [zero], [zero], [zero])


def _distributed_worker(rank, world, store_file, result_file):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank,
                           world_size=world)
    config = tiny_config()
    loader = build_loader(config, "test", distributed=True, batch_size=16, max_images=101)
    res = ev.iw_log_likelihood(_Deterministic(), loader, 3, progress=False, distributed=True)
    if rank == 0:
        Path(result_file).write_text(json.dumps(res))
    dist.destroy_process_group()


def test_distributed_nll_is_exact_over_ranks(tmp_path):
    config = tiny_config()
    torch.multiprocessing.spawn(_distributed_worker, args=(2, str(tmp_path / "store"),
                                str(tmp_path / "res.json")), nprocs=2)
    res = json.loads((tmp_path / "res.json").read_text())
    loader = build_loader(config, "test", batch_size=101, max_images=101)
    expected = next(iter(loader)).flatten(1).sum(1).double().mean().item()
    assert res["num_images"] == 101
    assert res["nll_nats"] == pytest.approx(expected, rel=1e-12)


# ------------------------------------------------------ sampling and BN -----
def test_temperature_lowers_sample_diversity(trained):
    model, _, _ = trained
    variances = [ev.generate(model, 128, t, batch_size=128, seed=11).var(0).mean().item()
                 for t in (0.4, 0.7, 1.0)]
    assert variances[0] < variances[1] < variances[2], variances


def test_per_group_temperatures_change_exactly_the_named_groups(trained):
    """generate(t=[1, 0, 0.5]): group 0 is drawn as at t = 1 (same seed, same z), group 1
    is exactly its prior mean, group 2 has standardised residuals with std 0.5.

    Latents are recorded at each group's combiner; the priors they induce come from
    a forward pass fed the same latents.  Std tolerance 10%: group 2 has 16 x 1024
    values, a relative standard error of 0.6%.
    """
    model, config, _ = trained
    groups = sum(config.groups_per_scale())
    assert groups == 3
    t = ev.parse_temperature("1,0,0.5")
    assert t == [1.0, 0.0, 0.5] and ev.parse_temperature("0.7") == 0.7
    with combiner_latents(model) as z:
        images = ev.generate(model, 16, t, batch_size=16, seed=0)
    with combiner_latents(model) as z_warm:
        ev.generate(model, 16, 1.0, batch_size=16, seed=0)
    assert images.shape == (16, 1, 28, 28) and 0 <= images.min() and images.max() <= 1
    torch.testing.assert_close(z[0], z_warm[0], rtol=0, atol=0)
    p_mu, p_log_sigma = priors_given(model, z)
    torch.testing.assert_close(z[1], p_mu[1], rtol=0, atol=1e-5)
    assert not torch.allclose(z_warm[1], p_mu[1], atol=1e-2)
    r = standardised(z, p_mu, p_log_sigma)
    assert abs(r[0].std().item() - 1.0) < 0.1 and abs(r[2].std().item() - 0.5) < 0.05, \
        [v.std().item() for v in r]


def _bn_state(model):
    return [(m.running_mean.clone(), m.running_var.clone(), m.momentum)
            for m in batchnorms(model)]


def test_readjust_bn_changes_stats_restores_mode_and_needs_no_data(trained, monkeypatch):
    import hvae.data

    monkeypatch.setattr(hvae.data, "build_dataset", lambda *a, **k: pytest.fail("data used"))
    model, _, _ = trained
    before = _bn_state(model)
    adjusted = ev.readjust_bn(model, t=0.6, num_batches=3, batch_size=16, seed=0)
    assert adjusted is not model and not adjusted.training
    assert all(not m.training for m in batchnorms(adjusted))
    after = _bn_state(adjusted)
    changed = [not torch.equal(a[0], b[0]) for a, b in zip(before, after)]
    assert any(changed), "decoder BN statistics should be re-estimated"
    assert not all(changed), "BN layers unused by sampling (encoder) keep their statistics"
    assert [a[2] for a in after] == [b[2] for b in before]
    for (m0, v0, _), (m1, v1, _) in zip(before, _bn_state(model)):  # original untouched
        assert torch.equal(m0, m1) and torch.equal(v0, v1)

    copy_in_train = copy.deepcopy(model).train()
    out = ev.readjust_bn(copy_in_train, t=1.0, num_batches=2, batch_size=8, inplace=True)
    assert out is copy_in_train and copy_in_train.training
    assert all(m.training for m in batchnorms(copy_in_train))


def test_readjusted_bn_statistics_are_sample_averages_and_sampling_uses_them(trained):
    """After readjust_bn(t, num_batches), each BN layer that sampling runs holds the mean
    over the batches of its inputs' per-channel batch mean and (unbiased) variance,
    recorded here from outside; the others keep theirs.  Sampling from the returned
    model normalises with exactly those statistics."""
    model, _, _ = trained
    bns = batchnorms(model)
    adjusted = copy.deepcopy(model)
    with record_inputs(batchnorms(adjusted)) as seen:
        ev.readjust_bn(adjusted, t=0.7, num_batches=3, batch_size=16, seed=0, inplace=True)
    used = 0
    for bn, new, calls in zip(bns, batchnorms(adjusted), seen):
        if not calls:
            assert torch.equal(bn.running_mean, new.running_mean)
            assert torch.equal(bn.running_var, new.running_var)
            continue
        used += 1
        assert len(calls) == 3
        means = torch.stack([a[0].double().mean(dim=(0, 2, 3)) for a in calls])
        variances = torch.stack([a[0].double().transpose(0, 1).flatten(1).var(1) for a in calls])
        torch.testing.assert_close(new.running_mean.double(), means.mean(0), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(new.running_var.double(), variances.mean(0), rtol=1e-4, atol=1e-6)
        assert not torch.allclose(new.running_mean, bn.running_mean)
    assert used > 0

    normalised = []

    def check(bn, args, output):
        expected = torch.nn.functional.batch_norm(args[0], bn.running_mean, bn.running_var,
                                                  bn.weight, bn.bias, False, 0.0, bn.eps)
        normalised.append(torch.allclose(output, expected, rtol=1e-5, atol=1e-5))

    handles = [bn.register_forward_hook(check) for bn in batchnorms(adjusted)]
    try:
        images = ev.generate(adjusted, 8, 0.7, seed=1)
    finally:
        for h in handles:
            h.remove()
    assert len(normalised) >= used and all(normalised)
    assert not torch.allclose(images, ev.generate(model, 8, 0.7, seed=1))


# ------------------------------------------------------------------ FID -----
def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(5000, 4)) * [1.0, 2.0, 0.5, 1.5] + [0.1, -0.2, 0.3, 0.0]
    mu, sigma = ev.feature_stats(feats)
    assert abs(ev.frechet_distance(mu, sigma, mu, sigma)) < 1e-8
    assert mu.shape == (4,) and np.allclose(sigma, np.cov(feats, rowvar=False))
    # Diagonal Gaussians: ||dmu||^2 + sum (s1 - s2)^2 with s the standard deviations.
    m1, s1 = np.array([0., 1, 2]), np.array([1., 2, 3])
    m2, s2 = np.array([1., 1, 0]), np.array([2., 2, 1])
    expected = ((m1 - m2) ** 2).sum() + ((s1 - s2) ** 2).sum()
    got = ev.frechet_distance(m1, np.diag(s1 ** 2), m2, np.diag(s2 ** 2))
    assert got == pytest.approx(expected, rel=1e-10)
    # Full covariances: Tr (S1 S2)^(1/2) = sum of sqrt(eigenvalues of S1 S2), all real >= 0.
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    c1, c2 = a @ a.T + 0.1 * np.eye(6), b @ b.T + 0.1 * np.eye(6)
    d1, d2 = rng.normal(size=6), rng.normal(size=6)
    tr_root = np.sqrt(np.linalg.eigvals(c1 @ c2).real).sum()
    ref = (d1 - d2) @ (d1 - d2) + np.trace(c1) + np.trace(c2) - 2 * tr_root
    assert ev.frechet_distance(d1, c1, d2, c2) == pytest.approx(ref, rel=1e-8)
    shifted = ev.feature_stats(feats + 1.0)
    assert ev.frechet_distance(mu, sigma, *shifted) == pytest.approx(4.0, rel=1e-6)
    streamed = ev.Moments()  # batches and a large offset change nothing
    for part in np.array_split(feats + 1e6, 7):
        streamed.update(part)
    assert np.allclose(streamed.stats()[0], mu + 1e6, rtol=0, atol=1e-6)
    assert np.allclose(streamed.stats()[1], sigma, rtol=1e-9, atol=1e-9)


def _pool_features(x):
    """A small stand-in for Inception: 4x4 average-pooled pixels (16 features)."""
    return nn.functional.adaptive_avg_pool2d(x.float(), 4).flatten(1)


def test_fid_end_to_end_with_stand_in_extractor(trained, tmp_path):
    model, config, x = trained
    key = {"dataset": "test-images", "extractor": "pool4"}
    cache = ev.stats_cache_path(tmp_path, key)
    loader_fn = lambda: torch.utils.data.DataLoader(x, batch_size=16)  # noqa: E731
    ref = ev.reference_stats(_pool_features, loader_fn, cache, key)
    assert cache.is_file()
    again = ev.reference_stats(_pool_features, lambda: pytest.fail("cache not used"), cache, key)
    assert np.array_equal(ref[0], again[0]) and np.array_equal(ref[1], again[1])
    same = ev.frechet_distance(*ev.loader_moments(_pool_features, loader_fn()).stats(), *ref)
    assert abs(same) < 1e-9

    seen = []
    sample = model.sample
    model.sample = lambda n, t=1.0: (seen.append(t), sample(n, t))[1]
    try:
        cold = ev.fid(model, _pool_features, ref, 64, t=0.5, batch_size=32, seed=0)
        warm = ev.fid(model, _pool_features, ref, 64, t=1.0, batch_size=32, seed=0)
    finally:
        del model.sample
    assert seen == [0.5, 0.5, 1.0, 1.0], "FID must sample at the requested temperature"
    assert cold > 0 and warm > 0 and cold != warm


def test_fid_weights_missing_gives_clear_error(tmp_path):
    with pytest.raises(ev.FIDWeightsError, match="--fid-weights"):
        ev.inception_extractor(None)
    with pytest.raises(ev.FIDWeightsError, match="does not exist"):
        ev.inception_extractor(tmp_path / "nope.pth")


def test_inception_weights_load_from_local_file_without_network(tmp_path, monkeypatch):
    pf = pytest.importorskip("pytorch_fid.inception")
    import torchvision

    net = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, weights=None,
                                          init_weights=False)  # same keys as FID Inception
    weights = tmp_path / "pt_inception.pth"
    torch.save(net.state_dict(), weights)
    del net

    def no_network(*_a, **_k):
        raise AssertionError("tried to download")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(pf, "load_state_dict_from_url", no_network)
    extract = ev.inception_extractor(weights)
    feats = extract(torch.rand(2, 1, 28, 28))
    assert feats.shape == (2, 2048) and torch.isfinite(feats).all()


# ------------------------------------------------------------------ CLI -----
def _json_line(text):
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    return json.loads(lines[0])


def _main(argv, capsys):
    cli.main([str(a) for a in argv])
    return _json_line(capsys.readouterr().out)


def test_cli_nll_subprocess_matches_the_library_for_the_same_seed(checkpoint):
    """evaluate.py --mode nll --seed S prints one JSON line with the numbers
    iw_log_likelihood gives for the same checkpoint, images and seed."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "evaluate.py"), "--checkpoint", str(checkpoint),
         "--mode", "nll", "--num", "20", "--num_iw_samples", "4", "--iw-chunk", "2",
         "--batch-size", "10", "--device", "cpu", "--seed", "3"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    res = _json_line(proc.stdout)
    assert res["mode"] == "nll" and res["num_images"] == 20 and res["num_samples"] == 4
    model, config = load_model(checkpoint)
    loader = build_loader(config, "test", batch_size=10, max_images=20)
    lib = ev.iw_log_likelihood(model, loader, 4, chunk=2, progress=False, seed=3)
    for key in ("nll_nats", "nelbo_nats", "nll_bpd", "nelbo_bpd"):
        assert res[key] == pytest.approx(lib[key], rel=1e-6, abs=1e-6), key
    assert res["nll_bpd"] == pytest.approx(res["nll_nats"] / (784 * math.log(2)))


def test_cli_sample_writes_png_and_uint8_npz(checkpoint, tmp_path, capsys):
    res = _main(["--checkpoint", checkpoint, "--mode", "sample", "--num", 10, "--temp", "0.8",
                 "--out", tmp_path, "--readjust-bn", "--readjust_bn_batches", 2,
                 "--batch_size", 8], capsys)
    assert res["temp"] == 0.8 and res["readjust_bn"] is True
    assert Path(res["files"]["png"]).is_file()
    images = np.load(res["files"]["npz"])["images"]
    assert images.shape == (10, 28, 28, 1) and images.dtype == np.uint8


def test_cli_recon(checkpoint, tmp_path, capsys):
    res = _main(["--checkpoint", checkpoint, "--mode", "recon", "--num", 12, "--out", tmp_path,
                 "--nrow", 6], capsys)
    assert res["num_images"] == 12 and 0 <= res["mse"] <= 1 and res["recon_nats"] > 0
    grid = np.load(res["files"]["npz"])["images"]
    assert grid.shape == (24, 28, 28, 1)  # 2 input rows + 2 reconstruction rows of 6


def test_cli_encode_then_decode_partial(checkpoint, tmp_path, capsys, trained):
    _, config, _ = trained
    groups = sum(config.groups_per_scale())
    res = _main(["--checkpoint", checkpoint, "--mode", "encode", "--num", 6, "--out", tmp_path],
                capsys)
    assert res["num_groups"] == groups and res["num_images"] == 6
    with np.load(res["files"]["npz"]) as f:
        assert sorted(f.files) == [f"group_{g:02d}" for g in range(groups)]
        partial = {k: f[k] for k in sorted(f.files)[:1]}
    part_file = tmp_path / "top.npz"
    np.savez(part_file, **partial)
    dec = _main(["--checkpoint", checkpoint, "--mode", "decode", "--latents", part_file,
                 "--temp", "0.5", "--out", tmp_path], capsys)
    assert dec["num"] == 6 and dec["num_groups_given"] == 1
    assert np.load(dec["files"]["npz"])["images"].shape == (6, 28, 28, 1)
    sampled = _main(["--checkpoint", checkpoint, "--mode", "encode", "--num", 3, "--sample",
                     "--split", "train", "--out", tmp_path / "s"], capsys)
    assert sampled["posterior"] == "sample" and sampled["num_images"] == 3


def test_cli_fid_uses_requested_temperature(checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ev, "inception_extractor", lambda weights, device: _pool_features)
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"stand-in")
    argv = ["--checkpoint", checkpoint, "--mode", "fid", "--num", 40, "--temp", "0.6",
            "--fid-weights", weights, "--fid-ref-num", 64, "--out", tmp_path]
    res = _main(argv, capsys)
    assert res["fid"] > 0 and res["temp"] == 0.6 and Path(res["reference_cache"]).is_file()
    assert _main(argv, capsys)["fid"] == pytest.approx(res["fid"])


def test_cli_fid_without_weights_fails_clearly(checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--checkpoint", str(checkpoint), "--mode", "fid", "--out", str(tmp_path)])
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert "--fid-weights" in captured.err and captured.out == ""


def test_reconstruction_grid_spreads_over_a_class_ordered_test_set():
    """A test set stored in class order (MNIST's) must not give a grid of zeros only:
    the inputs are evenly spaced over the whole set, each row of inputs above its recons."""
    labels = torch.arange(10).repeat_interleave(100)              # 1,000 images, class order
    dataset = [(torch.full((1, 2, 2), float(c)), c) for c in labels.tolist()]
    x = ev.evenly_spaced(dataset, 32)
    assert x.shape == (32, 1, 2, 2)
    assert set(x[:, 0, 0, 0].long().tolist()) == set(range(10))   # every class appears
    assert x[0, 0, 0, 0] == 0 and x[-1, 0, 0, 0] == 9             # first and last image
    assert ev.evenly_spaced(dataset[:5], 32).shape[0] == 5        # fewer images than asked
    grid = ev.interleave_rows(x, -x, nrow=8)
    assert torch.equal(grid[:8], x[:8]) and torch.equal(grid[8:16], -x[:8])


def test_cli_nll_honours_the_split(checkpoint, capsys):
    """--split train evaluates the training images (it used to report the test split)."""
    argv = ["--checkpoint", checkpoint, "--mode", "nll", "--num", 8, "--num-iw-samples", 2,
            "--seed", 1, "--no-progress"]
    train, test = (_main(argv + ["--split", split], capsys) for split in ("train", "test"))
    assert train["split"] == "train" and test["split"] == "test"
    model, config = load_model(checkpoint)
    for res, split in ((train, "train"), (test, "test")):
        loader = build_loader(config, split, shuffle=False, drop_last=False, max_images=8)
        lib = ev.iw_log_likelihood(model, loader, 2, progress=False, seed=1)
        assert res["nll_nats"] == pytest.approx(lib["nll_nats"], rel=1e-6), split
    assert train["nll_nats"] != pytest.approx(test["nll_nats"])
