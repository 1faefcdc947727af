"""Memory features (issue #17): gradient accumulation, activation checkpointing, the soft clamp."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from hvae.checkpoint import load_checkpoint
from hvae.runtime import Runtime
from hvae.training import Trainer, train

from test_training import (_assert_same_run, bernoulli_batch, digit_folder,  # noqa: F401
                           folder_config, tiny)


# ------------------------------------------------------- gradient accumulation --
def _deterministic(trainer: Trainer) -> None:
    """BatchNorm on running statistics and posterior means instead of samples: the
    loss of a batch is then the mean of its images' losses, however it is split."""
    model = trainer.model

    def train(mode=True):
        nn.Module.train(model, mode)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return model

    model.train = train
    trainer.train_step_fn.net = lambda x, **kw: model(x, use_mean=True, **kw)


def test_accumulated_micro_batches_take_the_big_batch_update(tmp_path):
    """2 micro-batches of 8 == one batch of 16: gradients, loss and weights (BN in eval mode)."""
    cfg = tiny(tmp_path, ema_decay=0.0, grad_clip=0.0, kl_balance=False, batch_size=8)
    x = bernoulli_batch(16, seed=3)
    results = []
    for batches in (x, [x[:8], x[8:]]):
        trainer = Trainer(cfg, Runtime(), progress=False, loaders=([x], [x]))
        _deterministic(trainer)
        metrics = trainer.train_step(batches)
        assert not metrics["skipped"]
        results.append((metrics, {n: p.grad.clone() for n, p in trainer.model.named_parameters()},
                        {k: v.clone() for k, v in trainer.model.state_dict().items()}))
    (m1, g1, w1), (m2, g2, w2) = results
    for key in ("loss", "nelbo", "recon", "kl", "reg", "grad_norm"):
        torch.testing.assert_close(m2[key], m1[key], rtol=1e-5, atol=1e-5, msg=key)
    scale = max(g.abs().max().item() for g in g1.values())
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], rtol=1e-4, atol=1e-6 * scale, msg=name)
    for name in w1:  # Adamax: float noise in a tiny gradient moves a weight by lr * noise / eps
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-4, atol=5e-5, msg=name)


class _RecordingNet:
    """The model with a DDP-like ``no_sync``: records which forwards ran inside it."""

    def __init__(self, model):
        self.model, self.calls, self._in_no_sync = model, [], False

    @contextlib.contextmanager
    def no_sync(self):
        self._in_no_sync = True
        try:
            yield
        finally:
            self._in_no_sync = False

    def __call__(self, x, **kw):
        self.calls.append(self._in_no_sync)
        return self.model(x, **kw)


def test_all_but_the_last_micro_batch_skip_the_all_reduce(tmp_path):
    cfg = tiny(tmp_path, grad_accum_steps=3, batch_size=4)
    batches = [bernoulli_batch(4, seed=i) for i in range(3)]
    trainer = Trainer(cfg, Runtime(), progress=False, loaders=(batches, batches))
    net = trainer.train_step_fn.net = _RecordingNet(trainer.model)
    assert not trainer.train_step(batches)["skipped"]
    assert net.calls == [True, True, False]
    assert trainer.steps_per_epoch == 1 and trainer.global_batch == 12


def test_schedules_count_optimiser_steps(tmp_path, digit_folder):
    """Epochs of 5 loader batches are 2 optimiser steps of 2 micro-batches (one left over)."""
    one = Trainer(folder_config(tmp_path / "a", digit_folder, batch_size=8, epochs=3),
                  Runtime(), progress=False)
    two = Trainer(folder_config(tmp_path / "b", digit_folder, batch_size=8, epochs=3,
                                grad_accum_steps=2, warmup_epochs=1.0), Runtime(), progress=False)
    assert len(two.train_loader) == 5 and one.steps_per_epoch == 5
    assert two.steps_per_epoch == 2 and two.total_steps == 6
    assert two.schedule.lr_warmup_steps == 2


ACCUM_RUN = dict(max_steps=5, deterministic=True, checkpoint_every=2, ema_decay=0.9,
                 batch_size=8, grad_accum_steps=2)


def test_stop_between_micro_batches_resumes_bit_identically(tmp_path, digit_folder):
    """SIGTERM during the second micro-batch of the third step: the step finishes, the
    run stops after it, and the resumed run equals an uninterrupted one bit for bit."""
    import signal
    reference = folder_config(tmp_path / "ref", digit_folder, **ACCUM_RUN)
    train(reference, progress=False)

    cfg = folder_config(tmp_path / "stop", digit_folder, **ACCUM_RUN)
    trainer = Trainer(cfg, Runtime(), progress=False)
    forwards = []

    def hook(module, args):
        forwards.append(trainer.step)
        if len(forwards) == 6:  # step 2's second micro-batch
            os.kill(os.getpid(), signal.SIGTERM)

    trainer.model.register_forward_pre_hook(hook)
    from hvae.runtime import Interrupted
    with pytest.raises(Interrupted):
        trainer.fit()
    ckpt = Path(cfg.out) / cfg.run_name / "checkpoint.pt"
    state = load_checkpoint(ckpt)
    assert state["step"] == 3 and state["data_position"] == {"epoch": 1, "batch": 2}
    train(cfg, progress=False, resume=ckpt)
    _assert_same_run(reference, cfg)


def test_ddp_with_accumulation_takes_the_single_process_update(tmp_path):
    """2 gloo ranks x 2 micro-batches (no_sync on the first) == 1 process averaging the
    4 micro-batches' gradients, each rank's noise stream replayed."""
    import copy
    from test_training import _ddp_worker, _free_port
    cfg = tiny(tmp_path, ema_decay=0.0, grad_clip=0.0, grad_accum_steps=2, batch_size=4)
    batches = [[bernoulli_batch(4, seed=2 * r + k) for k in range(2)] for r in range(2)]
    out_file = tmp_path / "ddp.pt"
    torch.multiprocessing.start_processes(
        _ddp_worker, args=(2, _free_port(), cfg.to_dict(), batches, str(out_file)),
        nprocs=2, start_method="spawn")
    ddp = torch.load(out_file)

    reference = Trainer(cfg, Runtime(), progress=False, loaders=(batches, batches[0]))
    spectral_state = copy.deepcopy(reference.spectral.state_dict())
    step, grads = reference.train_step_fn, []
    for rank, micro in enumerate(batches):
        reference.spectral.load_state_dict(spectral_state)
        torch.manual_seed(100 + rank)
        step.forward_backward(micro[0], 0, weight=0.5, first=True, last=False)
        loss, _ = step.forward_backward(micro[1], 0, weight=0.5, first=False, last=True)
        grads.append([p.grad.clone() for p in reference.model.parameters()])
    for p, ga, gb in zip(reference.model.parameters(), *grads):
        p.grad = (ga + gb) / 2
    scale = max(p.grad.abs().max().item() for p in reference.model.parameters())
    for name, p in reference.model.named_parameters():
        torch.testing.assert_close(ddp["grads"][name], p.grad, rtol=1e-4, atol=1e-6 * scale,
                                   msg=lambda m, name=name: f"grad {name}: {m}")


# ------------------------------------------------------ activation checkpointing --
def _step_grads(cfg, x, steps=2):
    """Losses, gradients and BatchNorm state of ``steps`` training steps from one seed."""
    trainer = Trainer(cfg, Runtime(), progress=False, loaders=([x], [x]))
    losses = []
    for _ in range(steps):
        losses.append(trainer.train_step(x)["loss"])
    grads = {n: p.grad for n, p in trainer.model.named_parameters()}
    return losses, grads, trainer.model.state_dict(), torch.get_rng_state()


@pytest.mark.parametrize("overrides", [dict(), dict(num_nf=1, grad_accum_steps=1)],
                         ids=["analytic_kl", "flows"])
def test_checkpointing_is_bit_identical_in_fp32(tmp_path, overrides):
    """Same losses, gradients, weights, BatchNorm statistics and RNG stream, bit for bit."""
    x = bernoulli_batch(8, seed=5)
    base = tiny(tmp_path, batch_size=8, ema_decay=0.0, **overrides)
    plain = _step_grads(base, x)
    remat = _step_grads(base.replace(activation_checkpointing=True), x)
    assert [l.item() for l in plain[0]] == [l.item() for l in remat[0]]
    for name, g in plain[1].items():
        assert torch.equal(g, remat[1][name]), name
    for name, w in plain[2].items():  # num_batches_tracked and running stats counted once
        assert torch.equal(w, remat[2][name]), name
    assert torch.equal(plain[3], remat[3])


def saved_bytes(model, x) -> int:
    """Bytes autograd keeps for backward after one training forward (distinct storages)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    del out
    return sum(storages.values())


def test_checkpointing_keeps_less_for_backward(tmp_path):
    from hvae.model import NVAE
    from hvae.model.remat import enable_activation_checkpointing
    cfg = tiny(tmp_path, batch_size=8)
    model = NVAE(cfg)
    x = bernoulli_batch(8)
    before = saved_bytes(model, x)
    after = saved_bytes(enable_activation_checkpointing(model), x)
    assert after < 0.5 * before, (before, after)


@pytest.mark.parametrize("overrides", [dict(amp="bf16"), dict(compile="regional")],
                         ids=["bf16", "regional_compile"])
def test_checkpointing_trains_under_amp_and_compile_and_skips_bad_batches(tmp_path, overrides,
                                                                          monkeypatch):
    """bf16 autocast and regionally compiled cells (aot_eager) train with checkpointing; a
    NaN batch is still skipped without a trace; results match the run without it."""
    import copy
    from hvae.model import compile as hcompile
    monkeypatch.setattr(hcompile, "BACKEND", "aot_eager")
    x = bernoulli_batch(8, seed=1)
    runs = []
    for remat in (False, True):
        cfg = tiny(tmp_path, batch_size=8, activation_checkpointing=remat, **overrides)
        trainer = Trainer(cfg, Runtime(), progress=False, loaders=([x], [x]))
        losses = [trainer.train_step(x)["loss"]]
        before = copy.deepcopy(trainer.model.state_dict())
        bad = x.clone()
        bad[0, 0, 3, 3] = float("nan")
        metrics = trainer.train_step(bad)
        assert metrics["skipped"]
        for key, value in trainer.model.state_dict().items():
            assert torch.equal(value, before[key]), key
        losses.append(trainer.train_step(x)["loss"])
        runs.append(torch.stack(losses))
    assert torch.isfinite(runs[1]).all()
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-3, atol=1e-3)


# ------------------------------------------------------------- cheaper activations --
def test_soft_clamp_keeps_one_tensor_and_has_the_tanh_gradient():
    from hvae.distributions import soft_clamp5
    x = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True) * 4
    x.retain_grad()
    assert torch.autograd.gradcheck(soft_clamp5, (x.detach().requires_grad_(),))
    ref = 5.0 * torch.tanh(x / 5.0)
    torch.testing.assert_close(soft_clamp5(x), ref, rtol=0, atol=0)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        y = soft_clamp5(x.float())
    assert len(kept) == 1 and kept[0] is y or kept[0].data_ptr() == y.data_ptr()


def _saved_bytes(fn, *args) -> tuple[torch.Tensor, int]:
    """fn(*args) and the bytes of distinct storages autograd keeps for its backward."""
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return out, sum(kept.values())


def test_weight_norm_keeps_only_its_output_and_has_the_right_gradient():
    from hvae.model.cells import weight_norm
    v = torch.randn(6, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    g = torch.randn(6, 1, 1, 1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v, g: weight_norm(v, g, (1, 2, 3)), (v, g))
    ref = v * (g.exp() / (torch.linalg.vector_norm(v, dim=(1, 2, 3), keepdim=True) + 1e-5))
    w, nbytes = _saved_bytes(lambda: weight_norm(v * 1.0, g, (1, 2, 3)))
    torch.testing.assert_close(w, ref, rtol=0, atol=0)
    assert nbytes < 1.1 * w.numel() * w.element_size()  # w (+ small norms), not v as well


def test_floored_log_sigma_keeps_one_tensor_and_has_the_right_gradient():
    import math
    from hvae.distributions import SIGMA_FLOOR, _FlooredLogSigma
    r = (torch.randn(500, dtype=torch.float64) * 6).requires_grad_()
    assert torch.autograd.gradcheck(_FlooredLogSigma.apply, (r,))
    y, nbytes = _saved_bytes(_FlooredLogSigma.apply, r)
    ref = torch.log(torch.exp(5 * torch.tanh(r / 5)) + SIGMA_FLOOR)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    assert nbytes == y.numel() * y.element_size() and math.isfinite(float(y.detach().sum()))


@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_shift_cell_recomputes_its_hidden_layers_with_identical_gradients(amp):
    """NVAE's shift cell keeps z (not its five hidden tensors) and gives the plain path's
    values and gradients bit for bit, also under bf16 autocast."""
    from hvae.model.flows import ShiftCell
    torch.manual_seed(0)
    cell = ShiftCell(4, mirror=True)
    z = torch.randn(2, 4, 32, 32, requires_grad=True)
    def ctx():  # one autocast region per path: torch 2.10's cast cache also keeps the casts
        # made without grad (in the Function's forward) and hands them to the other path
        return torch.autocast("cpu", dtype=torch.bfloat16) if amp == "bf16" else contextlib.nullcontext()
    with ctx():
        out, nbytes = _saved_bytes(lambda: cell(z)[0])
    with ctx():
        weights = (cell.inp.normalized_weight(), cell.mid.normalized_weight(),
                   cell.out.normalized_weight(), cell.out.bias)
        ref, plain_bytes = _saved_bytes(lambda: z - cell.shift(z, *weights).float())
    grad = torch.randn_like(out)
    params = [z, *cell.parameters()]
    for got, want in zip(torch.autograd.grad(out, params, grad), torch.autograd.grad(ref, params, grad)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    hidden = 6 * z.numel() * (2 if amp == "bf16" else 4)  # one hidden layer's tensor
    assert nbytes < hidden < plain_bytes / 4


def test_mixture_likelihood_is_recomputed_in_backward_with_identical_gradients():
    from hvae.model.nvae import Likelihood, OutputSpec
    spec = OutputSpec(binary=False, num_bits=8, channels=3)
    params = torch.randn(2, 100, 8, 8, requires_grad=True)
    x = torch.randint(0, 256, (2, 3, 8, 8)).float() / 255
    logp, nbytes = _saved_bytes(lambda: Likelihood(params * 1.0, spec).log_prob(x))
    plain, plain_bytes = _saved_bytes(lambda: Likelihood(params * 1.0, spec).dist.log_prob(2 * x - 1))
    torch.testing.assert_close(logp, plain, rtol=0, atol=0)
    torch.testing.assert_close(torch.autograd.grad(logp.sum(), params)[0],
                               torch.autograd.grad(plain.sum(), params)[0], rtol=0, atol=0)
    assert nbytes < 0.3 * plain_bytes


# ------------------------------------------------------------ the memory benchmark --
def test_bench_measures_memory_on_fake_cuda_tensors(tmp_path):
    """The fake-tensor measurement runs without a GPU; checkpointing and bf16 lower it."""
    from hvae.memory import resident_at_backward
    cfg = tiny(tmp_path, batch_size=32)
    gib = {(amp, remat): resident_at_backward(cfg.replace(amp=amp, activation_checkpointing=remat))
           for amp in ("none", "bf16") for remat in (False, True)}
    parts = gib["none", False]["resident_parts_bytes"]
    assert parts["optimizer"] == pytest.approx(2 * parts["ema"], rel=0.2) and parts["activations"] > 0
    act = {k: v["resident_parts_bytes"]["activations"] for k, v in gib.items()}
    assert act["none", True] < 0.6 * act["none", False]
    assert act["bf16", False] < act["none", False] and act["bf16", True] < act["none", True]
    assert not torch.is_autocast_enabled("cuda")  # the measurement leaves no state behind


def test_torchrun_trains_with_accumulation_and_checkpointing(tmp_path):
    """DDP (2 gloo processes) with 2 micro-batches per step and checkpointing, end to end;
    train.py prints the global batch."""
    import json
    from test_training import torchrun_train
    proc = torchrun_train(tmp_path, "--eval_batches", "1", "--num_iw_samples", "1",
                          "--grad_accum_steps", "2", "--activation_checkpointing", "true")
    assert "global batch 32 = batch_size 8 x grad_accum_steps 2 x 2 process(es)" in proc.stderr
    summary = json.loads([l for l in proc.stdout.splitlines() if l.startswith("{")][0])
    assert summary["steps"] == 3 and summary["skipped_steps"] == 0


def test_configs_without_the_new_fields_still_load():
    """Checkpoints written before issue #17 have no grad_accum_steps / activation_checkpointing."""
    from hvae.config import Config, ConfigError, preset
    old = {k: v for k, v in preset("demo").to_dict().items()
           if k not in ("grad_accum_steps", "activation_checkpointing")}
    cfg = Config.from_dict(old)
    assert cfg.grad_accum_steps == 1 and cfg.activation_checkpointing is False
    new = preset("demo", grad_accum_steps=4, activation_checkpointing=True)
    assert Config.from_dict(new.to_dict()) == new
    with pytest.raises(ConfigError, match="sync_bn"):
        preset("demo", activation_checkpointing=True, sync_bn=True)
