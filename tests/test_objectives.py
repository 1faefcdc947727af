"""Tests of hvae.objectives against formulas written out independently here."""
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from hvae.config import Config
from hvae.objectives import (SpectralRegularizer, active_units, bits_per_dim, bn_regularizer,
                             compute_loss, group_prior_weights, kl_balance, nelbo)
from hvae.schedules import Schedule


def cfg(**kw):
    return Config().replace(**kw)


def group_scale(c):
    """Each latent group's scale index, coarsest first (what model.group_scale holds)."""
    return [s for s, n in enumerate(c.groups_per_scale()) for _ in range(n)]


def kl_coeff(step, total, c):
    return Schedule(c, total).kl_weight(step)


def reg_coeff(step, total, c):
    return Schedule(c, total).reg_lambda(step)


class WNConv(nn.Conv2d):
    """Stand-in for hvae.model.cells.Conv2d: weight normalised per output channel."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.log_g = nn.Parameter(torch.randn(self.out_channels) * 0.3)

    def normalized_weight(self):
        norm = self.weight.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        return self.weight / norm * self.log_g.exp().view(-1, 1, 1, 1)


def conv_net():
    torch.manual_seed(0)
    return nn.Sequential(
        WNConv(3, 8, 3), nn.BatchNorm2d(8),
        WNConv(8, 8, 3), WNConv(8, 8, 3),          # same shape: batched together
        WNConv(8, 16, 1), WNConv(16, 16, 5, groups=16), nn.BatchNorm2d(16),
        nn.Conv2d(16, 4, 3),                        # plain conv: regularised via .weight
        nn.Linear(4, 4),                            # linear: not regularised
    )


def exact_sigma(module):
    w = module.normalized_weight() if hasattr(module, "normalized_weight") else module.weight
    return torch.linalg.matrix_norm(w.reshape(w.shape[0], -1), 2)


# ------------------------------------------------------------------ schedules
def test_kl_coeff_warmup_values():
    c = cfg(kl_const_portion=0.1, kl_anneal_portion=0.3, kl_const_coeff=1e-4, kl_beta=1.0)
    total = 1000  # const 100 steps, anneal 300 steps
    assert kl_coeff(0, total, c) == pytest.approx(1e-4)
    assert kl_coeff(100, total, c) == pytest.approx(1e-4)
    assert kl_coeff(175, total, c) == pytest.approx(0.25)
    assert kl_coeff(250, total, c) == pytest.approx(0.5)
    assert kl_coeff(400, total, c) == pytest.approx(1.0)
    assert kl_coeff(999, total, c) == pytest.approx(1.0)


def test_kl_coeff_beta_and_no_warmup():
    assert kl_coeff(0, 1000, cfg(kl_anneal_portion=0.0, kl_const_portion=0.0)) == 1.0
    beta = cfg(kl_anneal_portion=0.0, kl_beta=0.5)
    assert [kl_coeff(s, 1000, beta) for s in (0, 500, 999)] == [0.5, 0.5, 0.5]
    ramp = cfg(kl_const_portion=0.0, kl_anneal_portion=0.5, kl_beta=2.0)
    assert kl_coeff(125, 1000, ramp) == pytest.approx(0.5)  # 0.25 * 2
    assert kl_coeff(800, 1000, ramp) == pytest.approx(2.0)


def test_reg_coeff_constant_and_anneal():
    assert reg_coeff(0, 100, cfg(weight_decay_norm=0.1)) == 0.1
    c = cfg(weight_decay_norm=1e-2, weight_decay_norm_init=1.0, weight_decay_norm_anneal=True,
            kl_const_portion=0.0, kl_anneal_portion=0.5)
    assert reg_coeff(0, 1000, c) == pytest.approx(1.0)
    assert reg_coeff(250, 1000, c) == pytest.approx(0.1)   # geometric mid-point of 1 and 1e-2
    assert reg_coeff(500, 1000, c) == pytest.approx(1e-2)
    assert reg_coeff(900, 1000, c) == pytest.approx(1e-2)
    # no anneal window: the final value throughout
    assert reg_coeff(0, 1000, c.replace(kl_anneal_portion=0.0)) == pytest.approx(1e-2)


# -------------------------------------------------------------- KL balancing
def test_group_prior_weights_scale_sizes():
    c = cfg(num_latent_scales=3, num_groups_per_scale=4, ada_groups=True)
    assert c.groups_per_scale() == [1, 2, 4]
    w = group_prior_weights(group_scale(c))
    # 1 / alpha_i = n_s / 4**s (NVAE's code): top 1/1, middle 2/4, finest 4/16
    raw = torch.tensor([1.0, 0.5, 0.5, 0.25, 0.25, 0.25, 0.25])
    torch.testing.assert_close(w, raw / raw.mean())
    assert w.mean().item() == pytest.approx(1.0)


def test_kl_balance_direction_matches_nvae():
    """Equal KL in every group: a finer group's coefficient is n_s / (4**s n_0) of the top's.

    3-scale ada config, groups [1, 2, 4] (coarsest first).  By hand: raw
    weights 1, 2/4, 2/4, 4/16 x4 -> mean (1 + 0.5 + 0.5 + 1) / 7 = 3/7, so the
    coefficients are 7/3, 7/6, 7/6, 7/12, 7/12, 7/12, 7/12 (mean 1).  The
    opposite (size-proportional) direction would give a finest/top ratio of 16.
    """
    c = cfg(num_latent_scales=3, num_groups_per_scale=4, ada_groups=True)
    kl = torch.full((5, 7), 3.0)
    _, coeffs = kl_balance(kl, group_prior_weights(group_scale(c)))
    expected = torch.tensor([7 / 3, 7 / 6, 7 / 6, 7 / 12, 7 / 12, 7 / 12, 7 / 12])
    torch.testing.assert_close(coeffs, expected)
    assert coeffs[1] / coeffs[0] == pytest.approx(2 / (4 * 1))     # scale 1
    assert coeffs[-1] / coeffs[0] == pytest.approx(4 / (16 * 1))   # scale 2
    # the demo preset (groups [2, 5]): finest / top = 5 / (4 * 2) = 0.625
    demo = cfg()
    assert demo.groups_per_scale() == [2, 5]
    w = group_prior_weights(group_scale(demo))
    assert (w[-1] / w[0]).item() == pytest.approx(0.625)
    # a group's larger KL raises its coefficient in proportion (mean |KL| + 0.01)
    kl2 = kl.clone()
    kl2[:, 3] = 9.0
    _, c2 = kl_balance(kl2, group_prior_weights(group_scale(c)))
    assert (c2[3] / c2[4]).item() == pytest.approx(9.01 / 3.01)


def test_kl_balance_coefficients():
    torch.manual_seed(0)
    kl = [torch.randn(8, requires_grad=True) * s for s in (0.1, 2.0, 5.0)]  # one negative-ish
    weights = torch.tensor([0.5, 1.0, 1.5])
    balanced, coeffs = kl_balance(kl, weights)
    assert not coeffs.requires_grad
    assert coeffs.mean().item() == pytest.approx(1.0)
    expect = torch.stack([(k.detach().abs().mean() + 0.01) for k in kl]) * weights
    torch.testing.assert_close(coeffs, expect / expect.mean())
    torch.testing.assert_close(balanced, sum(c * k for c, k in zip(coeffs, kl)))
    assert balanced.requires_grad


def test_kl_balance_off_after_warmup_or_disabled():
    kl = [torch.rand(4) * s for s in (1.0, 10.0)]
    balanced, coeffs = kl_balance(kl, None)
    torch.testing.assert_close(coeffs, torch.ones(2))
    torch.testing.assert_close(balanced, kl[0] + kl[1])
    ramp = cfg(kl_const_portion=0.0, kl_anneal_portion=0.5)
    assert Schedule(ramp, 100).balancing(10) and not Schedule(ramp, 100).balancing(60)
    assert not Schedule(ramp.replace(kl_balance=False), 100).balancing(10)
    assert not Schedule(ramp.replace(kl_anneal_portion=0.0, kl_beta=0.5), 100).balancing(0)


# ----------------------------------------------------- spectral regulariser
def test_spectral_matches_exact_singular_values():
    net = conv_net()
    reg = SpectralRegularizer(net, num_power_iter=10)
    assert reg.num_weights == 6
    assert tuple(reg.u_8x72.shape) == (2, 8) and tuple(reg.v_8x72.shape) == (2, 72)
    for _ in range(30):
        sigmas = reg.singular_values()
    mods = dict(net.named_modules())
    assert set(sigmas) == {"0", "2", "3", "4", "5", "7"}  # Linear "8" and BNs excluded
    for name, s in sigmas.items():
        assert s.item() == pytest.approx(exact_sigma(mods[name]).item(), rel=1e-4), name
    total = reg()
    assert total.item() == pytest.approx(sum(exact_sigma(mods[n]).item() for n in sigmas), rel=1e-4)


def test_spectral_gradient_matches_exact():
    net = conv_net()
    reg = SpectralRegularizer(net, num_power_iter=20)
    for _ in range(20):
        reg()
    params = list(net.parameters())
    ours = torch.autograd.grad(reg(), params, allow_unused=True)
    exact_total = sum(exact_sigma(m) for _, m in net.named_modules()
                      if isinstance(m, nn.Conv2d))
    exact = torch.autograd.grad(exact_total, params, allow_unused=True)
    for g, e in zip(ours, exact):
        if e is None:
            assert g is None
            continue
        torch.testing.assert_close(g, e, rtol=1e-3, atol=1e-4)


def test_spectral_state_dict_roundtrip():
    net = conv_net()
    reg = SpectralRegularizer(net, num_power_iter=1)
    reg()
    reg()
    sd = reg.state_dict()
    assert {"u_8x72", "v_8x72", "u_8x27", "v_8x27", "initialized"} <= set(sd)
    assert not any(k.startswith("model") or "weight" in k for k in sd)  # model not included
    fresh = SpectralRegularizer(net, num_power_iter=1)
    assert fresh().item() != reg().item()  # differs before loading
    fresh.load_state_dict(reg.state_dict())
    assert fresh().item() == reg().item()


def test_spectral_batches_equal_shapes(monkeypatch):
    reg = SpectralRegularizer(conv_net(), num_power_iter=3)
    reg()  # first call: 30 iterations
    calls = []
    real_bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *a, **k: calls.append(1) or real_bmm(*a, **k))
    reg()
    groups = 5  # 8x27, 8x72 (two weights), 16x8, 16x25, 4x144
    assert len(calls) == groups * (2 * 3 + 2)  # (W^T u, W v) per iteration, u^T W v once


def test_spectral_follows_weight_dtype():
    net = conv_net().double()
    reg = SpectralRegularizer(net, num_power_iter=2)
    assert reg.u_8x72.dtype == torch.float64
    assert reg().dtype == torch.float32
    net.float()  # model converted after the regulariser was built: vectors follow
    reg()
    assert reg.u_8x72.dtype == torch.float32 and reg.state_dict()["v_8x72"].dtype == torch.float32


# ------------------------------------------------------------ BN regulariser
def test_bn_regularizer_sums_max_abs_gamma():
    net = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 3, 1), nn.BatchNorm1d(2),
                        nn.SyncBatchNorm(4), nn.BatchNorm2d(5, affine=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([0.5, -2.0, 1.0]))
        net[2].weight.copy_(torch.tensor([0.3, 0.1]))
        net[3].weight.copy_(torch.tensor([-0.2, 0.7, 0.1, 0.0]))
    assert bn_regularizer(net).item() == pytest.approx(2.0 + 0.3 + 0.7)


# -------------------------------------------------------------- compute_loss
class FakeLikelihood:
    def __init__(self, log_px):
        self.log_px = log_px

    def log_prob(self, x):
        return self.log_px


def fake_output(batch=4, groups=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    log_px = -(torch.rand(batch, generator=g) * 100 + 50)
    kl = [torch.rand(batch, generator=g) + 3 * (i + 1) for i in range(groups)]
    return SimpleNamespace(likelihood=FakeLikelihood(log_px.double()), kl=kl)


def loss_cfg(**kw):
    base = dict(num_latent_scales=2, num_groups_per_scale=2, ada_groups=True,  # groups [1, 2]
                kl_const_portion=0.0, kl_anneal_portion=0.5, kl_beta=1.0, kl_balance=True,
                kl_free_bits=0.0, weight_decay_norm=0.1, weight_decay_norm_anneal=False)
    return cfg(**{**base, **kw})


def loss_at(out, step, c, total=1000, reg=None):
    """compute_loss with the schedule's weights at ``step``, as the training step calls it."""
    sched = Schedule(c, total)
    weights = group_prior_weights(group_scale(c)) if sched.balancing(step) else None
    return compute_loss(-out.likelihood.log_px, out.kl, kl_weight=sched.kl_weight(step),
                        balance_weights=weights, free_bits=c.kl_free_bits, reg=reg)


def test_compute_loss_nelbo_and_weighting():
    out = fake_output()
    res = loss_at(out, 100, loss_cfg())
    recon = -out.likelihood.log_px.float()
    kl = torch.stack(out.kl, 1)
    torch.testing.assert_close(res.nelbo, recon + kl.sum(1))
    torch.testing.assert_close(nelbo(recon, out.kl), recon + kl.sum(1))
    assert res.nelbo.dtype == res.loss.dtype == torch.float32
    w = torch.tensor([1.0, 0.5, 0.5])  # n_s / 4**s for groups [1, 2]
    coeffs = (kl.abs().mean(0) + 0.01) * w
    coeffs = coeffs / coeffs.mean()
    torch.testing.assert_close(res.kl_coeffs, coeffs)
    torch.testing.assert_close(res.kl_groups, kl.mean(0))
    expected = (recon + 0.2 * (kl * coeffs).sum(1)).mean()  # kl weight 0.2 at step 100
    assert res.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert res.kl_term.item() == pytest.approx((0.2 * (kl * coeffs).sum(1)).mean().item(), rel=1e-6)
    assert res.reg.item() == 0.0  # no regulariser given


def test_compute_loss_after_warmup_is_nelbo_mean():
    out = fake_output()
    res = loss_at(out, 900, loss_cfg())
    torch.testing.assert_close(res.kl_coeffs, torch.ones(3))
    assert res.loss.item() == pytest.approx(res.nelbo.mean().item(), rel=1e-6)
    # constant beta: 0.5 throughout, and no balancing since the warm-up part is 1
    beta = loss_at(out, 0, loss_cfg(kl_anneal_portion=0.0, kl_beta=0.5))
    torch.testing.assert_close(beta.kl_coeffs, torch.ones(3))
    expected = (beta.recon + 0.5 * beta.kl_groups.sum()).mean()
    assert beta.loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_compute_loss_includes_regulariser():
    net = conv_net()
    spectral = SpectralRegularizer(net, num_power_iter=1)
    out = fake_output()
    c = loss_cfg(kl_balance=False)
    terms = spectral() + bn_regularizer(net)
    assert spectral.initialized and terms.item() > bn_regularizer(net).item() > 0
    res = loss_at(out, 100, c, reg=0.1 * terms)
    assert res.reg.item() == pytest.approx(0.1 * terms.item())
    kl = torch.stack(out.kl, 1)
    recon = -out.likelihood.log_px.float()
    expected = (recon + 0.2 * kl.sum(1)).mean() + 0.1 * terms
    assert res.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert res.loss.requires_grad  # the regulariser's gradient reaches the weights


def test_free_bits_only_in_loss():
    out = fake_output()
    kl = torch.stack(out.kl, 1)
    means = kl.mean(0)
    fb = float((means[0] + means[1]) / 2)  # above group 0's mean, below the others
    assert means[0] < fb < means[1] < means[2]
    c = loss_cfg(kl_free_bits=fb)
    plain = loss_at(out, 900, loss_cfg())
    freed = loss_at(out, 900, c)
    torch.testing.assert_close(freed.nelbo, plain.nelbo)
    recon = -out.likelihood.log_px.float()
    expected = recon.mean() + torch.clamp(means, min=fb).sum()
    assert freed.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    # the group below the threshold gets no gradient, the others do
    kl_req = [k.clone().requires_grad_() for k in out.kl]
    res = loss_at(SimpleNamespace(likelihood=out.likelihood, kl=kl_req), 900, c)
    grads = torch.autograd.grad(res.loss, kl_req, allow_unused=True)
    assert grads[0] is None or torch.all(grads[0] == 0)
    torch.testing.assert_close(grads[1], torch.full((4,), 0.25))


def test_bits_per_dim_known_values():
    assert bits_per_dim(math.log(2) * 3072, 3072) == pytest.approx(1.0)
    assert bits_per_dim(784 * math.log(2) * 0.5, 784) == pytest.approx(0.5)
    torch.testing.assert_close(bits_per_dim(torch.tensor([0.0, 2 * math.log(2)]), 2),
                               torch.tensor([0.0, 1.0]))


def test_active_units():
    batch1 = [torch.tensor([[0.0, 1.0, 0.005], [0.0, 1.0, 0.005]]), torch.tensor([[0.5], [0.0]])]
    batch2 = [torch.tensor([[0.0, 0.0, 0.03]]), torch.tensor([[0.0]])]
    # channel means over 3 examples: [0, 2/3, 0.04/3 > 0.01]; group 1: [0.5/3]
    assert active_units([batch1, batch2]) == [2, 1]
    assert active_units(batch1) == [1, 1]  # single batch: [0, 1, 0.005] and [0.25]
