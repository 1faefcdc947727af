"""Training loop: learning, exact resume, DDP equivalence, bf16, NaN skipping, bad checkpoints."""
from __future__ import annotations

import contextlib
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
from hvae.checkpoint import CheckpointError, load_checkpoint
from hvae.config import preset
from hvae.runtime import Interrupted, Runtime
from hvae.schedules import Schedule
from hvae.step import GradSkipper
from hvae.training import Trainer, TrainingDiverged, train

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
    before = ev.test_metrics(trainer.eval_model, trainer.test_loader,
                             max_batches=cfg.eval_batches)["test_nelbo"]
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
    assert load_checkpoint(ckpt)["step"] == 7
    _assert_same_run(straight, interrupted)


def torchrun_environment(rank: int, world_size: int, port: int) -> None:
    """What torchrun sets for rank ``rank`` of a local group (workers of spawned tests),
    and one thread each."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)


def _ddp_worker(rank, world_size, port, cfg_dict, batches, out_file):
    torchrun_environment(rank, world_size, port)
    from hvae.config import Config
    from hvae.training import Trainer, init_runtime
    cfg = Config.from_dict(cfg_dict)
    test = [b if torch.is_tensor(b) else b[0] for b in batches]  # b: a batch or micro-batches
    trainer = Trainer(cfg, init_runtime("cpu"), progress=False, loaders=(batches, test))
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
    step = reference.train_step_fn
    for rank, x in enumerate(batches):
        reference.spectral.load_state_dict(spectral_state)
        torch.manual_seed(100 + rank)
        loss, _ = step.forward_backward(x, 0)
        grads.append([p.grad.clone() for p in reference.model.parameters()])
    for p, ga, gb in zip(reference.model.parameters(), *grads):
        p.grad = (ga + gb) / 2
    step.update(loss, 0)
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
        assert math.isfinite(float(metrics["loss"])) and not metrics["skipped"]


def test_nan_batch_is_skipped_counted_and_leaves_no_trace(tmp_path):
    cfg = tiny(tmp_path)
    trainer = Trainer(cfg, Runtime(), progress=False)
    trainer.train_step(bernoulli_batch(seed=0))
    before = copy.deepcopy(trainer.model.state_dict())
    spectral_before = copy.deepcopy(trainer.spectral.state_dict())
    bad = bernoulli_batch(seed=1)
    bad[0, 0, 5, 5] = float("nan")
    metrics = trainer.train_step(bad)
    assert metrics["skipped"] and int(metrics["skipped_total"]) == 1
    for key, value in trainer.model.state_dict().items():  # num_batches_tracked included
        assert torch.equal(value, before[key]), key
    for key, value in trainer.spectral.state_dict().items():  # power-iteration vectors too
        assert torch.equal(value, spectral_before[key]), key
    assert not trainer.train_step(bernoulli_batch(seed=2))["skipped"]


def test_grad_skipper_cannot_stall_forever():
    skipper = GradSkipper(factor=10, warmup=5, patience=3)
    loss = torch.tensor(1.0)

    def should_skip(norm):
        norm = torch.tensor(norm)
        skip = skipper.decide(norm, loss)
        skipper.record(norm, skip)
        return bool(skip)

    for _ in range(5):
        assert not should_skip(1.0)
    assert not should_skip(9.0)  # below 10 x the median
    decisions = [should_skip(1000.0) for _ in range(10)]
    assert decisions[:3] == [True] * 3 and not all(decisions)
    assert should_skip(float("inf")) and should_skip(float("nan"))
    assert bool(skipper.decide(torch.tensor(1.0), torch.tensor(float("nan"))))  # NaN loss
    assert int(skipper.skipped) == 10 and int(skipper.consecutive) == 4  # 8 outliers + inf + nan
    state = skipper.state_dict()
    copy_ = GradSkipper(factor=10, warmup=5, patience=3)
    copy_.load_state_dict(state)
    for a, b in zip(state.values(), copy_.state_dict().values()):
        torch.testing.assert_close(a, b, equal_nan=True, rtol=0, atol=0)


def test_lower_median_is_nanmedian():
    from hvae.step import lower_median
    g = torch.Generator().manual_seed(0)
    for n, valid in [(1, 0), (1, 1), (100, 0), (100, 1), (100, 2), (100, 37), (100, 100), (7, 4)]:
        values = torch.full((n,), math.nan)
        values[:valid] = torch.randn(valid, generator=g)
        values = values[torch.randperm(n, generator=g)]
        torch.testing.assert_close(lower_median(values), torch.nanmedian(values), equal_nan=True,
                                   rtol=0, atol=0)
        if valid:  # the skipper's padding, +inf, counts as empty too
            padded = torch.where(values.isnan(), math.inf, values)
            assert torch.equal(lower_median(padded), torch.nanmedian(values))


def test_grad_skipper_history_is_inf_padded_and_reads_nan_padded_checkpoints():
    skipper = GradSkipper(factor=10, history=4, warmup=1)
    assert torch.equal(skipper.norms, torch.full((4,), math.inf))
    norm = torch.tensor(2.0)
    skipper.record(norm, skipper.decide(norm, torch.tensor(1.0)))
    state = skipper.state_dict()
    assert torch.equal(state["norms"], torch.tensor([2.0, math.inf, math.inf, math.inf]))
    old = {**state, "norms": torch.tensor([2.0, math.nan, math.nan, math.nan])}  # older layout
    restored = GradSkipper(factor=10, history=4, warmup=1)
    restored.load_state_dict(old)
    assert torch.equal(restored.norms, state["norms"])
    assert bool(restored.decide(torch.tensor(21.0), torch.tensor(1.0)))  # 21 > 10 x 2
    assert not bool(restored.decide(torch.tensor(19.0), torch.tensor(1.0)))


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
        coeffs = row["kl_coeffs"].numpy()
        if row["kl_weight"] < 1:
            assert abs(coeffs.mean() - 1) < 1e-5 and coeffs.std() > 0
        else:
            assert np.allclose(coeffs, 1.0)
    assert rows[0]["kl_weight"] < 1 and rows[-1]["kl_weight"] == 1.0


def test_learning_rate_schedule():
    cfg = preset("demo", learning_rate=1e-2, learning_rate_min=1e-4)
    schedule = Schedule(cfg, total_steps=100, lr_warmup_steps=10)
    assert schedule.learning_rate(0) == pytest.approx(1e-3)
    assert schedule.learning_rate(9) == pytest.approx(1e-2)
    assert schedule.learning_rate(55) == pytest.approx((1e-2 + 1e-4) / 2)
    assert schedule.learning_rate(100) == pytest.approx(1e-4)


def test_train_py_rejects_typos_and_bad_values():
    for argv, needle in ((["--num_chanels_enc", "8"], "num_channels_enc"),
                         (["--num_x_bits", "9"], "num_x_bits"),
                         (["--image_size", "30"], "image_size")):
        proc = subprocess.run([sys.executable, str(REPO / "train.py"), *argv],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and needle in proc.stderr, proc.stderr


def torchrun(tmp_path, script: str, *args: str) -> subprocess.CompletedProcess:
    """``script`` (in the repo root) under torchrun: 2 gloo processes of one thread, in
    ``tmp_path``; asserts a zero exit."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def torchrun_train(tmp_path, *flags: str) -> subprocess.CompletedProcess:
    """train.py under ``torchrun``, 3 steps of a narrow model writing to
    ``tmp_path / "runs"``; ``flags`` add to (or override) those."""
    return torchrun(tmp_path, "train.py", "--no-progress", "--out", str(tmp_path / "runs"),
                    "--max_steps", "3", "--num_channels_enc", "8", "--num_channels_dec", "8",
                    "--num_groups_per_scale", "2", "--num_latent_per_group", "4",
                    "--batch_size", "8", "--channels_last", "false", *flags)


def test_torchrun_two_cpu_processes_train_end_to_end(tmp_path):
    """The README's multi-process command on CPU (gloo): trains, evaluates its shard, rank 0 writes."""
    out = tmp_path / "runs"
    proc = torchrun_train(tmp_path, "--eval_batches", "2", "--num_iw_samples", "2")
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    assert len(lines) == 1, proc.stdout  # only rank 0 reports
    summary = json.loads(lines[0])
    assert summary["steps"] == 3 and math.isfinite(summary["iw_nll_nats"])
    assert load_checkpoint(out / "demo" / "checkpoint.pt")["step"] == 3
    assert not (out / "demo" / ".lock").exists()  # rank 0 alone locked the folder, and let go
    # README's evaluation under torchrun: --num-images (torchrun owns --num), one report
    proc = torchrun(tmp_path, "evaluate.py", "--checkpoint", str(out / "demo" / "checkpoint.pt"),
                    "--mode", "nll", "--num-images", "6", "--num-iw-samples", "2", "--no-progress")
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    assert len(lines) == 1, proc.stdout  # rank 0 alone prints
    assert json.loads(lines[0])["num_images"] == 6


# ------------------------------------------------------- stops and resumes --
def _final_state(cfg):
    return load_checkpoint(Path(cfg.out) / cfg.run_name / "checkpoint.pt")


def assert_identical(a, b, where: str = "checkpoint") -> None:
    """``a`` and ``b`` (nested dicts and lists of tensors and plain values) are equal:
    the same keys, and every tensor of the same dtype, shape and values (torch.equal, for
    which NaN != NaN: a NaN anywhere fails)."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        assert torch.is_tensor(a) and torch.is_tensor(b), where
        assert (a.dtype, a.shape) == (b.dtype, b.shape) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), (where, list(a), list(b))
        for key in a:
            assert_identical(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}/{i}")
    else:
        assert a == b, (where, a, b)


def _assert_same_run(a_cfg, b_cfg):
    """The final checkpoints agree in every entry and every tensor (model, EMA, optimiser,
    spectral vectors, the gradient-skip history and counts, every RNG state ...) except
    the run folder in the config, and every logged training loss agrees exactly."""
    a, b = _final_state(a_cfg), _final_state(b_cfg)
    for state in (a, b):
        state["config"].pop("out")
    assert_identical(a, b)

    def losses(cfg):
        rows = [json.loads(l) for l in
                (Path(cfg.out) / cfg.run_name / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}

    assert losses(a_cfg) == losses(b_cfg)


@contextlib.contextmanager
def short_skip_history():
    """Gradient skippers with a history of 3 norms that decide after 2: the 7-step runs
    below wrap the ring twice and decide with it at every step from the third."""
    import functools
    import hvae.training
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(hvae.training, "GradSkipper",
                      functools.partial(GradSkipper, history=3, warmup=2))
        yield


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, digit_folder):
    """The reference run: 7 steps over epochs of 2 (evaluations in between), final IW NLL."""
    cfg = folder_config(tmp_path_factory.mktemp("ref"), digit_folder, **STOP_RUN)
    with short_skip_history():
        summary = train(cfg, progress=False)
    skip = _final_state(cfg)["grad_skip"]
    assert skip["norms"].numel() == 3 and int(skip["accepted"]) == 7  # wrapped, none skipped
    return cfg, summary


STOP_RUN = dict(max_steps=7, deterministic=True, checkpoint_every=2, ema_decay=0.9)


def _interrupt_and_resume(tmp_path, digit_folder, signum, inject):
    """Run with ``inject(trainer)`` arranging a signal; expect the stop, then resume."""
    import signal
    cfg = folder_config(tmp_path, digit_folder, **STOP_RUN)
    with short_skip_history():
        trainer = Trainer(cfg, Runtime(), progress=False)
        inject(trainer, signum)
        with pytest.raises(Interrupted) as stop:
            trainer.fit()
        assert stop.value.signum == signum and stop.value.exit_code == 128 + signum
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
        stopped_at = _final_state(cfg)["step"]
        summary = train(cfg, progress=False, resume=Path(cfg.out) / cfg.run_name / "checkpoint.pt")
    return cfg, stopped_at, summary


def test_sigterm_inside_a_checkpoint_write_stops_cleanly_and_resumes_exactly(
        tmp_path, digit_folder, uninterrupted, monkeypatch):
    import signal
    import hvae.checkpoint
    real_save = torch.save

    def inject(trainer, signum):
        def save_with_signal(obj, f, *args, **kwargs):
            if obj.get("step") == 4 and not hasattr(save_with_signal, "sent"):
                save_with_signal.sent = True
                os.kill(os.getpid(), signum)  # arrives while the file is being written
            return real_save(obj, f, *args, **kwargs)
        monkeypatch.setattr(hvae.checkpoint.torch, "save", save_with_signal)

    cfg, stopped_at, summary = _interrupt_and_resume(tmp_path, digit_folder, signal.SIGTERM, inject)
    # the write finished; step 4 ends an epoch, whose evaluation stops at its first batch
    assert stopped_at == 4
    ref_cfg, ref = uninterrupted
    _assert_same_run(ref_cfg, cfg)
    assert summary["iw_nll_nats"] == ref["iw_nll_nats"]
    assert summary["test_nelbo"] == ref["test_nelbo"]
    assert not list((Path(cfg.out) / cfg.run_name).glob(".*.tmp"))


def test_ctrl_c_inside_the_optimizer_step_stops_cleanly_and_resumes_exactly(
        tmp_path, digit_folder, uninterrupted):
    import signal

    def inject(trainer, signum):
        def hook(optimizer, args, kwargs):
            if trainer.step == 2:  # inside the update of the third step
                os.kill(os.getpid(), signum)
        trainer.optimizer.register_step_post_hook(hook)

    cfg, stopped_at, _ = _interrupt_and_resume(tmp_path, digit_folder, signal.SIGINT, inject)
    assert stopped_at == 4
    _assert_same_run(uninterrupted[0], cfg)


def test_sigterm_in_a_forward_pass_stops_after_that_step_and_resumes_exactly(
        tmp_path, digit_folder, uninterrupted):
    import signal

    def inject(trainer, signum):
        def hook(module, args):
            if trainer.step == 4 and module.training:  # the fifth step's forward
                os.kill(os.getpid(), signum)
        trainer.model.register_forward_pre_hook(hook)

    cfg, stopped_at, _ = _interrupt_and_resume(tmp_path, digit_folder, signal.SIGTERM, inject)
    assert stopped_at == 5
    _assert_same_run(uninterrupted[0], cfg)


def test_sigterm_while_an_evaluation_writes_images_resumes_exactly(
        tmp_path, digit_folder, uninterrupted, monkeypatch):
    """The stop comes after the first epoch's evaluation, which the resumed run repeats:
    evaluation draws nothing from the run's random streams, so its repeat leaves them as
    they were (the reconstructions' posterior samples once came from the global RNG)."""
    import signal
    real_reconstruct = ev.reconstruct

    def inject(trainer, signum):
        def reconstruct_with_signal(*args, **kwargs):
            if not hasattr(reconstruct_with_signal, "sent"):
                reconstruct_with_signal.sent = True
                os.kill(os.getpid(), signum)
            return real_reconstruct(*args, **kwargs)
        monkeypatch.setattr(ev, "reconstruct", reconstruct_with_signal)

    cfg, stopped_at, _ = _interrupt_and_resume(tmp_path, digit_folder, signal.SIGTERM, inject)
    assert stopped_at == 2
    _assert_same_run(uninterrupted[0], cfg)


def test_sigterm_during_the_final_evaluation_resumes_to_the_same_result(
        tmp_path, digit_folder, uninterrupted, monkeypatch):
    import signal

    from hvae.evaluation import likelihood
    real_iw = likelihood.iw_log_px

    def inject(trainer, signum):
        def iw_with_signal(*args, **kwargs):
            if not hasattr(iw_with_signal, "sent"):
                iw_with_signal.sent = True
                os.kill(os.getpid(), signum)
            return real_iw(*args, **kwargs)
        monkeypatch.setattr(likelihood, "iw_log_px", iw_with_signal)

    cfg, stopped_at, summary = _interrupt_and_resume(tmp_path, digit_folder, signal.SIGTERM, inject)
    assert stopped_at == 7
    ref_cfg, ref = uninterrupted
    _assert_same_run(ref_cfg, cfg)
    for key in ("iw_nll_nats", "iw_nelbo_nats", "test_nelbo", "active_units_total"):
        assert summary[key] == ref[key], key


def test_diverged_weights_stop_the_run_and_are_never_saved(tmp_path):
    cfg = tiny(tmp_path, max_steps=6, learning_rate=1e30, warmup_epochs=0, grad_clip=0.0,
               checkpoint_every=1, log_every=2, grad_skip=False)
    with pytest.raises(TrainingDiverged, match="non-finite at or before step"):
        train(cfg, progress=False)
    ckpt = Path(cfg.out) / cfg.run_name / "checkpoint.pt"
    if ckpt.exists():  # whatever was saved is finite
        state = load_checkpoint(ckpt)
        assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_weights_only_checkpoint_cannot_resume_and_says_why(tmp_path):
    from hvae.checkpoint import CheckpointError, save_checkpoint
    cfg = tiny(tmp_path)
    path = tmp_path / "weights.pt"
    save_checkpoint(path, {"config": cfg.to_dict(), "model": {}})
    with pytest.raises(CheckpointError, match="cannot resume training: it lacks optimizer"):
        Trainer(cfg, Runtime(), progress=False, resume=path)


def test_corrupt_item_met_in_training_saves_then_names_it(tmp_path, digit_folder):
    import shutil
    from hvae.data import DataError
    folder = tmp_path / "digits"
    shutil.copytree(digit_folder, folder)
    cfg = folder_config(tmp_path, folder, max_steps=4, checkpoint_every=1000, eval_every=100)
    trainer = Trainer(cfg, Runtime(), progress=False)  # the files are sound when it starts
    sampler, batch = trainer.train_loader.sampler, cfg.batch_size
    seen = []
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        seen.append(list(sampler)[: 2 * batch])
    # an image of the second epoch's first batch that the first epoch did not use
    index = next(i for i in seen[1][:batch] if i not in seen[0])
    bad = sorted(folder.iterdir())[index]
    bad.write_bytes(b"not a png")
    with pytest.raises(DataError, match=bad.name):
        trainer.fit()
    assert load_checkpoint(Path(cfg.out) / cfg.run_name / "checkpoint.pt")["step"] == 2
