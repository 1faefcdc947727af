"""Training loop: learning, exact resume, DDP equivalence, bf16, NaN skipping, bad checkpoints."""
from __future__ import annotations

import copy
import itertools
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hvae import evaluation as ev
from hvae import objectives
from hvae.checkpoint import CheckpointError, load_checkpoint
from hvae.config import preset
from hvae.training import GradSkipper, Runtime, Trainer, learning_rate, train

REPO = Path(__file__).resolve().parents[1]
TINY = dict(num_channels_enc=8, num_channels_dec=8, num_groups_per_scale=2,
            num_latent_per_group=4, num_preprocess_cells=1, num_postprocess_cells=1,
            batch_size=16, num_iw_samples=2, eval_batches=2, log_every=1, warmup_epochs=0)


def tiny(tmp_path, **overrides):
    return preset("demo", out=str(tmp_path / "runs"), **{**TINY, **overrides})


@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory):
    """48 real bundled digits written as PNG files: a dataset with 2 steps per epoch."""
    from hvae.data import load_mnist_subset
    images = load_mnist_subset()[0][:48]
    folder = tmp_path_factory.mktemp("digits")
    for i, img in enumerate(np.asarray(images).reshape(-1, 28, 28).astype(np.uint8)):
        Image.fromarray(img, mode="L").save(folder / f"{i:03d}.png")
    return folder


def folder_config(tmp_path, folder, **overrides):
    return tiny(tmp_path, dataset="folder", data=str(folder), num_iw_samples=2, **overrides)


def bernoulli_batch(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.full((n, 1, 28, 28), 0.2), generator=g)


def test_short_run_lowers_the_nelbo(tmp_path):
    cfg = tiny(tmp_path, max_steps=40, ema_decay=0.0, checkpoint_every=1000)
    trainer = Trainer(cfg, Runtime(), progress=False)
    before = trainer.evaluate()["test_nelbo"]
    summary = trainer.fit()
    assert summary["steps"] == 40
    assert summary["test_nelbo"] < before - 50, (before, summary["test_nelbo"])
    # IW NLL <= NELBO up to Monte-Carlo noise, computed rather than guessed.  Per image,
    # -logmeanexp_k(log w_k) <= mean_k(-log w_k) = mean_k(nelbo_k + d_k) (Jensen), where
    # d = -log w - nelbo is the Monte-Carlo KL minus the analytic KL, of mean 0.  So
    # iw_nll <= iw_nelbo + mean(d) over the N x K draws of the IW pass; test_nelbo is
    # another single draw per image of the NELBO's expectation.  sd(d) and sd(nelbo) are
    # measured here on the same test images (8 more draws each); 4 standard errors.
    model = trainer.eval_model.eval()
    with torch.no_grad():
        draws = [ev.log_weights(model, x, repeats=8)
                 for x in itertools.islice(trainer.test_loader, cfg.eval_batches)]
    d = torch.cat([-lw - ne for lw, ne in draws])
    nelbo = torch.cat([ne for _, ne in draws]).view(-1, 8)
    n, k = summary["iw_num_images"], summary["iw_num_samples"]
    assert n == 2 * 16 and k == 2
    se_d = d.std().item() / math.sqrt(n * k)
    se_nelbo = nelbo.var(1).mean().sqrt().item() / math.sqrt(n)  # one draw per image
    assert summary["iw_nll_nats"] <= summary["iw_nelbo_nats"] + 4 * se_d, (summary, se_d)
    assert summary["iw_nll_nats"] <= summary["test_nelbo"] + 4 * math.hypot(se_d, se_nelbo), \
        (summary, se_d, se_nelbo)
    run = Path(cfg.out) / cfg.run_name
    for name in ("config.json", "checkpoint.pt", "metrics.jsonl", "samples_t0.6.png",
                 "samples_t1.0.png", "reconstructions.png"):
        assert (run / name).is_file(), name
    assert any(p.name.startswith("events") for p in (run / "tensorboard").iterdir())
    state = load_checkpoint(run / "checkpoint.pt")  # weights_only load works
    assert state["step"] == 40 and state["ema"] is None


def test_exact_resume_is_bit_identical(tmp_path, digit_folder):
    """Stopped after 3 steps (mid-epoch 2) and resumed == uninterrupted, bit for bit."""
    common = dict(max_steps=7, deterministic=True, checkpoint_every=1000, ema_decay=0.9)
    straight = folder_config(tmp_path / "a", digit_folder, **common)
    train(straight, progress=False)
    interrupted = folder_config(tmp_path / "b", digit_folder, **common)
    out = train(interrupted, progress=False, stop_at_step=3)
    assert out["stopped"] and out["step"] == 3
    ckpt = Path(interrupted.out) / interrupted.run_name / "checkpoint.pt"
    assert load_checkpoint(ckpt)["data_position"] == {"epoch": 1, "batch": 1}
    train(interrupted, progress=False, resume=ckpt)

    a = load_checkpoint(Path(straight.out) / straight.run_name / "checkpoint.pt")
    b = load_checkpoint(ckpt)
    assert a["step"] == b["step"] == 7
    for part in ("model", "ema", "spectral"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)

    def losses(cfg):
        lines = (Path(cfg.out) / cfg.run_name / "metrics.jsonl").read_text().splitlines()
        rows = [json.loads(l) for l in lines]
        return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}

    assert losses(straight) == losses(interrupted)


def _ddp_worker(rank, world_size, port, cfg_dict, batches, out_file):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from hvae.config import Config
    from hvae.training import Trainer, init_runtime
    cfg = Config.from_dict(cfg_dict)
    trainer = Trainer(cfg, init_runtime("cpu"), progress=False, loaders=(batches, batches))
    torch.manual_seed(100 + rank)
    trainer.train_step(batches[rank])
    if rank == 0:
        grads = {n: p.grad for n, p in trainer.model.named_parameters()}
        torch.save({"weights": trainer.model.state_dict(), "grads": grads}, out_file)
    torch.distributed.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_take_the_single_process_update(tmp_path):
    """2 gloo ranks with half-batches A, B == 1 process averaging the gradients of A and B
    (BatchNorm statistics are per process, as in DDP without SyncBatchNorm)."""
    cfg = tiny(tmp_path, ema_decay=0.0, grad_clip=0.0)
    batches = [bernoulli_batch(8, seed=1), bernoulli_batch(8, seed=2)]
    out_file = tmp_path / "ddp.pt"
    torch.multiprocessing.start_processes(
        _ddp_worker, args=(2, _free_port(), cfg.to_dict(), batches, str(out_file)),
        nprocs=2, start_method="spawn")
    ddp = torch.load(out_file)

    reference = Trainer(cfg, Runtime(), progress=False, loaders=(batches, batches))
    spectral_state = copy.deepcopy(reference.spectral.state_dict())
    grads = []
    for rank, x in enumerate(batches):
        reference.spectral.load_state_dict(spectral_state)
        torch.manual_seed(100 + rank)
        reference.forward_backward(x)
        grads.append([p.grad.clone() for p in reference.model.parameters()])
    for p, ga, gb in zip(reference.model.parameters(), *grads):
        p.grad = (ga + gb) / 2
    reference.update()
    ref = reference.model.state_dict()
    scale = max(p.grad.abs().max().item() for p in reference.model.parameters())
    for name, p in reference.model.named_parameters():
        torch.testing.assert_close(ddp["grads"][name], p.grad, rtol=1e-4, atol=1e-6 * scale,
                                   msg=lambda m, name=name: f"grad {name}: {m}")
        # Adamax divides by max(|g|, eps): float noise in a tiny gradient moves a weight
        # by up to lr * noise / eps, hence the weight tolerance of a few 1e-5.
        torch.testing.assert_close(ddp["weights"][name], ref[name], rtol=1e-4, atol=5e-5,
                                   msg=lambda m, name=name: f"weight {name}: {m}")


def test_bf16_autocast_trains_with_finite_losses(tmp_path):
    cfg = tiny(tmp_path, amp="bf16")
    trainer = Trainer(cfg, Runtime(), progress=False)
    for i in range(3):
        metrics = trainer.train_step(bernoulli_batch(seed=i))
        assert math.isfinite(metrics["loss"]) and not metrics["skipped"]


def test_nan_batch_is_skipped_counted_and_leaves_no_trace(tmp_path):
    cfg = tiny(tmp_path)
    trainer = Trainer(cfg, Runtime(), progress=False)
    trainer.train_step(bernoulli_batch(seed=0))
    before = copy.deepcopy(trainer.model.state_dict())
    bad = bernoulli_batch(seed=1)
    bad[0, 0, 5, 5] = float("nan")
    metrics = trainer.train_step(bad)
    assert metrics["skipped"] and metrics["skipped_total"] == 1
    for key, value in trainer.model.state_dict().items():
        if value.is_floating_point():
            assert torch.equal(value, before[key]), key
    assert not trainer.train_step(bernoulli_batch(seed=2))["skipped"]


def test_grad_skipper_cannot_stall_forever():
    skipper = GradSkipper(factor=10, warmup=5, patience=3)
    for _ in range(5):
        assert not skipper.should_skip(1.0)
    decisions = [skipper.should_skip(1000.0) for _ in range(10)]
    assert decisions[:3] == [True] * 3 and not all(decisions)
    assert skipper.should_skip(float("inf")) and skipper.should_skip(float("nan"))


def test_truncated_checkpoint_gives_a_clear_error_and_keeps_the_best(tmp_path):
    cfg = tiny(tmp_path, max_steps=2, checkpoint_every=1)
    train(cfg, progress=False)
    run = Path(cfg.out) / cfg.run_name
    path = run / "checkpoint.pt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError):
        Trainer(cfg, Runtime(), progress=False, resume=path)
    assert load_checkpoint(run / "checkpoint_best.pt")["step"] == 2
    wrong = tiny(tmp_path, num_channels_enc=16)
    with pytest.raises(CheckpointError, match="does not fit"):
        Trainer(wrong, Runtime(), progress=False, resume=run / "checkpoint_best.pt")


def test_kl_balancing_during_training(tmp_path):
    cfg = tiny(tmp_path, max_steps=10, kl_anneal_portion=0.5, kl_const_portion=0.0)
    trainer = Trainer(cfg, Runtime(), progress=False)
    rows = [trainer.train_step(bernoulli_batch(seed=i)) for i in range(10)]
    for row in rows:
        coeffs = np.array(row["kl_coeffs"])
        if row["kl_coeff"] < 1:
            assert abs(coeffs.mean() - 1) < 1e-5 and coeffs.std() > 0
        else:
            assert np.allclose(coeffs, 1.0)
    assert rows[0]["kl_coeff"] < 1 and rows[-1]["kl_coeff"] == 1.0


def test_learning_rate_schedule():
    cfg = preset("demo", learning_rate=1e-2, learning_rate_min=1e-4)
    assert learning_rate(0, 100, 10, cfg) == pytest.approx(1e-3)
    assert learning_rate(9, 100, 10, cfg) == pytest.approx(1e-2)
    assert learning_rate(55, 100, 10, cfg) == pytest.approx((1e-2 + 1e-4) / 2)
    assert learning_rate(100, 100, 10, cfg) == pytest.approx(1e-4)


def test_train_py_rejects_typos_and_bad_values():
    for argv, needle in ((["--num_chanels_enc", "8"], "num_channels_enc"),
                         (["--num_x_bits", "9"], "num_x_bits"),
                         (["--image_size", "30"], "image_size")):
        proc = subprocess.run([sys.executable, str(REPO / "train.py"), *argv],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and needle in proc.stderr, proc.stderr


def test_torchrun_two_cpu_processes_train_end_to_end(tmp_path):
    """The README's multi-process command on CPU (gloo): trains, evaluates its shard, rank 0 writes."""
    out = tmp_path / "runs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "train.py"), "--no-progress", "--out", str(out), "--max_steps", "3",
           "--num_channels_enc", "8", "--num_channels_dec", "8", "--num_groups_per_scale", "2",
           "--num_latent_per_group", "4", "--batch_size", "8", "--eval_batches", "2",
           "--num_iw_samples", "2", "--channels_last", "false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    assert len(lines) == 1, proc.stdout  # only rank 0 reports
    summary = json.loads(lines[0])
    assert summary["steps"] == 3 and math.isfinite(summary["iw_nll_nats"])
    assert load_checkpoint(out / "demo" / "checkpoint.pt")["step"] == 3


def test_ctrl_c_saves_a_checkpoint_that_resumes(tmp_path, monkeypatch):
    cfg = tiny(tmp_path, max_steps=6, checkpoint_every=1000)
    trainer = Trainer(cfg, Runtime(), progress=False)
    real_step = Trainer.train_step

    def interrupted_step(self, x):
        if self.step == 2:
            raise KeyboardInterrupt
        return real_step(self, x)

    monkeypatch.setattr(Trainer, "train_step", interrupted_step)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    ckpt = Path(cfg.out) / cfg.run_name / "checkpoint.pt"
    assert load_checkpoint(ckpt)["step"] == 2
    monkeypatch.setattr(Trainer, "train_step", real_step)
    assert train(cfg, progress=False, resume=ckpt)["steps"] == 6
