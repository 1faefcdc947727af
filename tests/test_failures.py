"""Every failure is one line (issue #33): memory that runs out, Ctrl-C in evaluate.py, a
truncated LMDB, a failed ablation sub-run, diverged weights.  Caused as a user causes
them: real processes, real limits, real signals, real files.  (A full disk is in
tests/test_run_folder.py.)"""
from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
TINY = ("--no-progress --num_channels_enc 8 --num_channels_dec 8 --num_groups_per_scale 2 "
        "--num_latent_per_group 4 --num_preprocess_cells 1 --num_postprocess_cells 1 "
        "--num_iw_samples 1 --eval_batches 1 --ema_decay 0 --warmup_epochs 0 "
        "--weight_decay_norm 0").split()


def run(script, *args, cwd, limit_bytes=None, timeout=300):
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=cwd,
                          env=ENV, capture_output=True, text=True, timeout=timeout,
                          preexec_fn=limit if limit_bytes else None)


def last_line(proc, prog, code):
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == code and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[-1].startswith(f"{prog}: error: "), proc.stderr[-2000:]
    assert sum(": error: " in line for line in lines) == 1, proc.stderr[-2000:]
    return lines[-1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("failures")
    proc = run("train.py", *TINY, "--out", tmp, "--name", "r", "--batch_size", 16,
               "--max_steps", 1, cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return tmp / "r" / "checkpoint.pt"


def test_out_of_memory_while_training_says_which_and_what_to_try(tmp_path):
    """A batch too large for the memory the process may use (an address-space limit of
    6 GiB; importing torch takes about 3.3 of it)."""
    proc = run("train.py", "--no-progress", "--out", tmp_path, "--batch_size", 2000,
               "--max_steps", 2, cwd=tmp_path, limit_bytes=6 * 2**30)
    line = last_line(proc, "train.py", 1)
    assert "out of host memory at step 0 (training, batch 2000)" in line, line
    assert "no checkpoint was saved yet" in line and "smaller --batch_size" in line


def test_out_of_memory_in_the_importance_weighted_pass(checkpoint, tmp_path):
    proc = run("evaluate.py", "--checkpoint", checkpoint, "--mode", "nll", "--num", 4,
               "--num-iw-samples", 10**9, "--iw-chunk", 10**9, "--batch-size", 4,
               "--no-progress", cwd=tmp_path)
    line = last_line(proc, "evaluate.py", 1)
    assert "out of host memory in the importance-weighted pass" in line
    assert "smaller --iw-chunk" in line and "--batch-size" in line


def test_ctrl_c_in_evaluate_exits_130_in_one_line(checkpoint, tmp_path):
    proc = subprocess.Popen([sys.executable, str(REPO / "evaluate.py"), "--checkpoint",
                             str(checkpoint), "--mode", "nll", "--num-iw-samples", "100000"],
                            cwd=tmp_path, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    err = bytearray()

    def read():
        while chunk := os.read(proc.stderr.fileno(), 4096):
            err.extend(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        start = time.time()
        while b"IW NLL" not in err:  # its progress bar: the pass has begun
            assert proc.poll() is None and time.time() - start < 120, err.decode()[-2000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        reader.join()
    text = err.decode()
    assert proc.returncode == 130 and "Traceback" not in text, text[-2000:]
    assert text.strip().splitlines()[-1] == "evaluate.py: interrupted (Ctrl-C)"
    assert proc.stdout.read() == b""


def test_a_truncated_lmdb_is_named_not_a_bus_error(tmp_path):
    from hvae.data import open_lmdb, lmdb_key, LMDB_LENGTH_KEY, encode_raw

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        (tmp_path / "data" / split).mkdir(parents=True)
        env = open_lmdb(tmp_path / "data" / split, write=True, map_size=1 << 24)
        with env.begin(write=True) as txn:
            for i in range(40):
                txn.put(lmdb_key(i), encode_raw(rng.integers(0, 256, (28, 28), dtype=np.uint8)))
            txn.put(LMDB_LENGTH_KEY, b"40")
        env.close()
    data = tmp_path / "data" / "train" / "data.mdb"
    os.truncate(data, 3 * 4096)  # an interrupted copy: the header promises more pages
    proc = run("train.py", *TINY, "--out", tmp_path / "runs", "--dataset", "lmdb", "--data",
               tmp_path / "data", "--binary", "false", "--batch_size", 4, "--max_steps", 1,
               cwd=tmp_path)
    line = last_line(proc, "train.py", 2)  # not 135 (SIGBUS)
    assert f"LMDB file {data} is truncated: 12288 bytes" in line, line


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_a_failed_ablation_sub_run_prints_its_own_error_line(tmp_path):
    """--gpus 0 on a machine without a GPU: the worker's run fails, and the sweep says why
    (its reason used to be only in the run's log)."""
    proc = run("scripts/ablate_kl.py", "--gpus", "0", "--max-steps", 1, "--variants", "full",
               "--out", tmp_path / "sweep", "--no-progress", cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stdout + proc.stderr
    failed = [line for line in proc.stdout.splitlines() if "FAILED" in line]
    assert len(failed) == 1, proc.stdout
    assert "FAILED (exit 2): ablate_kl.py: error: 'cuda:0' is not available" in failed[0]
    assert "full-s1.log" in failed[0]


@pytest.mark.parametrize("clip", [0, 200])
def test_diverged_weights_exit_1_and_name_grad_clip_only_when_it_is_off(tmp_path, capsys, clip):
    import train as train_cli

    argv = [*TINY, "--out", str(tmp_path), "--batch_size", "16", "--max_steps", "4",
            "--learning_rate", "1e30", "--grad_skip", "false", "--log_every", "2",
            "--grad_clip", str(clip)]
    with pytest.raises(SystemExit) as exit_:
        train_cli.main(argv)
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_.value.code == 1 and "non-finite" in line, line
    assert ("--grad_clip" in line) == (clip == 0), line


def test_ctrl_c_in_an_ablation_sweep_saves_the_run_and_exits_130(tmp_path):
    sweep = tmp_path / "sweep"
    proc = subprocess.Popen([sys.executable, str(REPO / "scripts" / "ablate_kl.py"), "--variants",
                             "full", "--max-steps", "100000", "--out", str(sweep), *TINY,
                             "--batch_size", "16", "--checkpoint_every", "1"],
                            cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    checkpoint = sweep / "runs" / "full-s1" / "checkpoint.pt"
    try:
        start = time.time()
        while not checkpoint.exists():  # training
            assert proc.poll() is None and time.time() - start < 120, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and "Traceback" not in out + err, (out + err)[-3000:]
    assert "FAILED" not in out and "sweep stopped" in out, out
    assert "continue with --resume" in err


def test_gpu_memory_running_out_in_the_final_pass_says_training_is_saved(tmp_path, monkeypatch):
    """The CPU cannot run out of GPU memory: the final importance-weighted pass raises
    torch's OutOfMemoryError as CUDA's allocator would."""
    import torch
    from hvae import evaluation as ev
    from hvae.config import preset
    from hvae.errors import RunFailed
    from hvae.training import train

    def out_of_memory(*_args, **_kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(ev, "iw_log_likelihood", out_of_memory)
    cfg = preset("demo", out=str(tmp_path), name="r", max_steps=1, num_channels_enc=8,
                 num_channels_dec=8, num_groups_per_scale=2, num_latent_per_group=4,
                 batch_size=16, eval_batches=1, ema_decay=0.0)
    with pytest.raises(RunFailed) as err:
        train(cfg, progress=False)
    line = str(err.value)
    assert "out of GPU memory (cpu) in the final importance-weighted test pass" in line, line
    assert "training is finished and the last checkpoint is" in line and "(step 1)" in line
    assert "--iw-chunk" in line and err.value.exit_code == 1
