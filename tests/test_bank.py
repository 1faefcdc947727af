"""hvae.model.bank: weights stacked once per step give the same weights, gradients
and BatchNorm state as computing them module by module."""
import contextlib
import copy

import pytest
import torch

from hvae import objectives
from hvae.config import preset
from hvae.model import NVAE
from hvae.model.bank import shared_stack, stacked_weights
from hvae.model.cells import Conv2d

TINY = dict(num_channels_enc=8, num_channels_dec=8, num_latent_per_group=4,
            num_groups_per_scale=2, batch_size=4)


def model(name="demo", **overrides):
    torch.manual_seed(0)
    overrides = {**TINY, **({"image_size": 8} if name == "cifar10" else {}), **overrides}
    return NVAE(preset(name, **overrides))


def strides(t):
    """Strides of the dimensions longer than 1 (the others do not affect the layout)."""
    return [st for st, n in zip(t.stride(), t.shape) if n > 1]


@pytest.mark.parametrize("channels_last", [False, True])
def test_stacked_weights_equal_per_conv_weights_with_their_strides(channels_last):
    net = model("cifar10", channels_last=channels_last)  # plain, normalised and masked convs
    convs = [m for m in net.modules() if isinstance(m, Conv2d)]
    alone = [c.normalized_weight() for c in convs]
    with net.stacked_weights():
        stacked = [c.normalized_weight() for c in convs]
        assert all(c.batched_weight is not None for c in convs)
    assert all(c.batched_weight is None for c in convs)  # dropped after the block
    for conv, a, s in zip(convs, alone, stacked):
        torch.testing.assert_close(s, a, rtol=1e-6, atol=1e-7)
        assert strides(s) == strides(conv.weight)


def test_nested_blocks_share_one_stack():
    net = model()
    with net.stacked_weights():
        conv = net.stem
        outer = conv.normalized_weight()
        with stacked_weights(net):
            assert conv.normalized_weight() is outer


def loss_and_grads(net, x, stacked):
    """Forward, NELBO, spectral and BN regularisers, backward."""
    spectral = objectives.SpectralRegularizer(net, num_power_iter=2)
    torch.manual_seed(1)
    with net.stacked_weights() if stacked else contextlib.nullcontext():
        out = net(x, analytic_kl=not net.config.kl_mc)
        reg = spectral() + objectives.bn_regularizer(net)
    loss = (-out.likelihood.log_prob(x) + sum(out.kl)).mean() + 0.1 * reg
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in net.named_parameters()}


@pytest.mark.parametrize("name", ["demo", "cifar10"])
def test_gradients_and_batchnorm_state_match_per_module_path(name):
    net = model(name)
    ref = copy.deepcopy(net)
    cfg = net.config
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(4, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g) > 0.5).float()
    loss_s, grads_s = loss_and_grads(net, x, stacked=True)
    ref.stacked_weights = contextlib.nullcontext  # the reference never stacks: per-module weights
    loss_r, grads_r = loss_and_grads(ref, x, stacked=False)
    torch.testing.assert_close(loss_s, loss_r)
    for key, grad in grads_r.items():
        torch.testing.assert_close(grads_s[key], grad, rtol=1e-4, atol=1e-6, msg=key)
    for (key, a), b in zip(net.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, msg=key)  # running stats, num_batches_tracked


def test_regularisers_use_the_shared_stacks():
    net = model("cifar10")
    norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with net.stacked_weights():
        stack = shared_stack([m for m in norms if m.weight.numel() == norms[0].weight.numel()])
        assert stack is not None and stack.tensor.shape[0] > 1
        assert shared_stack(norms[:1]) is None  # not a whole group
