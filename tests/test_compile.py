"""The compiled fast path (``--compile``) on the CPU with the ``aot_eager`` backend:
the same loss and gradients as eager, no graph breaks, no recompiles while
training, and compiled code reused across latent groups.
"""
import copy

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from hvae.config import ConfigError, preset
from hvae.model import NVAE
from hvae import training as training_module
from hvae.model import compile as hcompile
from hvae.objectives import compute_loss
from hvae.runtime import Runtime
from hvae.training import Trainer

BACKEND = "aot_eager"  # traces and partitions like inductor, generates no code
TINY_CIFAR = dict(num_channels_enc=8, num_channels_dec=8, num_latent_per_group=4,
                  num_groups_per_scale=2, image_size=8, batch_size=4)
TINY_DEMO = dict(num_channels_enc=8, num_channels_dec=8, num_latent_per_group=4,
                 num_groups_per_scale=2, batch_size=2)


@pytest.fixture(autouse=True, scope="module")
def fresh_dynamo():
    """One dynamo cache for the module: later tests reuse what earlier ones compiled."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def batch(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (cfg.batch_size, cfg.in_channels, cfg.image_size, cfg.image_size)
    if cfg.binary:
        return (torch.rand(shape, generator=g) > 0.5).float()
    return torch.randint(0, 256, shape, generator=g).float() / 255


def loss_and_grads(model, x, kl_weight=0.5):
    torch.manual_seed(1)  # the same posterior noise for both models
    with model.stacked_weights():
        out = model(x, analytic_kl=not model.config.kl_mc)
    loss = compute_loss(-out.likelihood.log_prob(x), out.kl_groups, kl_weight=kl_weight).loss
    model.zero_grad(set_to_none=True)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def assert_same_pass(compiled, eager, x, eval_too=True):
    """Loss and gradients of one training pass, then (``eval_too``) eval-mode outputs, as eager."""
    loss_c, grads_c = loss_and_grads(compiled, x)
    loss_e, grads_e = loss_and_grads(eager, x)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-4)
    assert grads_c.keys() == grads_e.keys()
    for key in grads_e:
        torch.testing.assert_close(grads_c[key], grads_e[key], rtol=1e-4, atol=1e-5, msg=key)
    if not eval_too:
        return
    for m in (compiled, eager):
        m.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, use_mean=True).params, eager(x, use_mean=True).params,
                                   rtol=1e-5, atol=1e-5)
    for m in (compiled, eager):
        m.train()


def test_regional_matches_eager():
    """cifar10: IAF flows (masked convs, Monte-Carlo KL), logistic mixture, one
    up-sampling post-processing cell; training and eval mode."""
    torch.manual_seed(0)
    eager = NVAE(preset("cifar10", **TINY_CIFAR))
    compiled = hcompile.compile_model(copy.deepcopy(eager), "regional", backend=BACKEND)
    before = graphs()
    assert_same_pass(compiled, eager, batch(eager.config))
    # pre-processing cell, stride-2 cell, tower cell, top group, other groups,
    # up-sampling and plain post-processing cells: 7 kinds, in train and eval mode
    assert graphs() - before <= 14 and not counters["graph_break"]


def test_regional_code_is_shared_by_all_groups():
    """A model with three times as many latent groups compiles nothing new."""
    torch.manual_seed(0)
    big = NVAE(preset("cifar10", **{**TINY_CIFAR, "num_groups_per_scale": 4}))
    hcompile.compile_model(big, "regional", backend=BACKEND)
    loss_and_grads(big, batch(big.config))  # compiles whatever is new
    compiled = graphs()
    huge = NVAE(preset("cifar10", **{**TINY_CIFAR, "num_groups_per_scale": 12}))
    hcompile.compile_model(huge, "regional", backend=BACKEND)
    with torch._dynamo.config.patch(error_on_recompile=True):
        loss_and_grads(huge, batch(huge.config))
    assert graphs() == compiled and not counters["graph_break"]


def test_regional_bf16_autocast_matches_eager():
    torch.manual_seed(0)
    eager = NVAE(preset("cifar10", **TINY_CIFAR))
    compiled = hcompile.compile_model(copy.deepcopy(eager), "regional", backend=BACKEND)
    x = batch(eager.config)
    with torch.autocast("cpu", torch.bfloat16):
        loss_c, grads_c = loss_and_grads(compiled, x)
        loss_e, grads_e = loss_and_grads(eager, x)
    assert torch.isfinite(loss_c) and not counters["graph_break"]
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-3, atol=1e-2)
    assert grads_c.keys() == grads_e.keys()


@pytest.mark.parametrize("cuda_graphs", [False, True], ids=["eager_step", "sync_free_step"])
def test_training_steps_do_not_recompile(tmp_path, monkeypatch, cuda_graphs):
    """Five real training steps (changing KL weight, balancing, learning rate) through
    the Trainer: after the first, nothing compiles again; also in the sync-free step of
    ``--cuda_graphs`` (uncaptured on the CPU), whose schedules are device scalars."""
    monkeypatch.setattr(hcompile, "BACKEND", BACKEND)
    monkeypatch.setattr(training_module, "graph_blockers", lambda config, runtime: [])
    cfg = preset("cifar10", **TINY_CIFAR, compile="regional", epochs=1, cuda_graphs=cuda_graphs,
                 kl_anneal_portion=0.9, warmup_epochs=0.5, ema_decay=0.9)
    data = [batch(cfg, seed) for seed in range(5)]
    trainer = Trainer(cfg, Runtime(), progress=False, run_dir=tmp_path, loaders=(data, data[:1]))
    assert trainer.total_steps == 5
    assert type(trainer.train_step_fn).__name__ == ("SyncFreeStep" if cuda_graphs else "TrainStep")
    trainer.train_step(data[0])
    first = graphs()
    weights = set()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for x in data[1:]:
            metrics = trainer.train_step(x)
            weights.add(float(metrics["kl_weight"]))
            assert torch.isfinite(metrics["loss"])
    assert len(weights) == 4  # the KL weight changed every step
    assert graphs() == first and not counters["graph_break"]
    ema_group = trainer.ema.model.groups[1]  # the EMA copy (evaluation) stays eager
    assert ema_group.forward.__func__ is type(ema_group).forward


def test_full_compile_matches_eager():
    """demo: two scales, up-sampling groups, channels-last, analytic KL, Bernoulli."""
    torch.manual_seed(0)
    eager = NVAE(preset("demo", **TINY_DEMO))
    compiled = hcompile.compile_model(copy.deepcopy(eager), "full", backend=BACKEND)
    before = graphs()
    assert_same_pass(compiled, eager, batch(eager.config), eval_too=False)
    assert graphs() == before + 1 and not counters["graph_break"]


def test_unknown_mode_is_rejected():
    with pytest.raises(ConfigError, match="compile='fast' is not allowed"):
        hcompile.compile_model(NVAE(preset("demo", **TINY_DEMO)), "fast")
