"""A run folder belongs to one run (issue #33): a new run never replaces another's files,
a second live process is kept out, and the lock goes with every exit.  Real processes,
real signals, real files."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hvae.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
TINY = ("--no-progress --num_channels_enc 8 --num_channels_dec 8 --num_groups_per_scale 2 "
        "--num_latent_per_group 4 --num_preprocess_cells 1 --num_postprocess_cells 1 "
        "--batch_size 16 --num_iw_samples 1 --eval_batches 1 --ema_decay 0 --warmup_epochs 0 "
        "--weight_decay_norm 0").split()
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def train_py(tmp_path, *flags, wait=True):
    cmd = [sys.executable, str(REPO / "train.py"), *TINY, "--out", str(tmp_path / "runs"),
           "--name", "r", *map(str, flags)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    if not wait:
        return proc
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def one_line_error(code, err, *needles):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and "Traceback" not in err, err[-2000:]
    assert lines[-1].startswith("train.py: error: "), err[-2000:]
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])


def wait_for(condition, proc, timeout=120):
    start = time.time()
    while not condition():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() - start < timeout
        time.sleep(0.05)


def test_a_new_run_never_replaces_another_runs_folder(tmp_path):
    run = tmp_path / "runs" / "r"
    code, _, err = train_py(tmp_path, "--max_steps", 2)
    assert code == 0, err[-2000:]
    before = {name: (run / name).read_bytes() for name in ("checkpoint.pt", "metrics.jsonl")}

    code, _, err = train_py(tmp_path, "--max_steps", 1)  # the quick run after the real one
    one_line_error(code, err, "already holds a run", "--resume", "--name", "--overwrite true")
    other = tmp_path / "elsewhere.pt"  # resuming another checkpoint into this folder
    other.write_bytes(before["checkpoint.pt"])
    code, _, err = train_py(tmp_path, "--resume", other, "--max_steps", 3)
    one_line_error(code, err, "already holds a run", "--resume (no file)")
    assert {name: (run / name).read_bytes() for name in before} == before
    assert not (run / ".lock").exists()

    code, _, err = train_py(tmp_path, "--max_steps", 1, "--overwrite", "true")
    assert code == 0 and "removed the earlier run's checkpoint.pt" in err, err[-2000:]
    assert load_checkpoint(run / "checkpoint.pt")["step"] == 1
    rows = (run / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == len(before["metrics.jsonl"].splitlines())  # this run's rows only
    assert not (run / ".lock").exists()


def test_a_second_process_is_kept_out_and_the_lock_goes_with_a_signal(tmp_path):
    run = tmp_path / "runs" / "r"
    first = train_py(tmp_path, "--max_steps", 100000, "--checkpoint_every", 1, wait=False)
    wait_for(lambda: (run / "checkpoint.pt").exists(), first)  # training, lock held
    code, _, err = train_py(tmp_path, "--resume")
    one_line_error(code, err, f"in use by process {first.pid} on ", "another --name")
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 143 and "Traceback" not in err, err[-2000:]
    assert "continue with --resume" in err
    assert not (run / ".lock").exists()


def test_ctrl_c_while_starting_releases_the_lock(tmp_path):
    run = tmp_path / "runs" / "r"
    proc = train_py(tmp_path, "--max_steps", 2, wait=False)
    wait_for(lambda: (run / ".lock").exists(), proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert not (run / ".lock").exists()


KILLED_OWNER = """
import os, signal, sys, tempfile
from pathlib import Path
from hvae.run_folder import RunLock, temp_prefix
run = Path(sys.argv[1])
RunLock(run).acquire()
tempfile.mkstemp(prefix=temp_prefix(run / "checkpoint.pt"), suffix=".tmp", dir=run)
os.kill(os.getpid(), signal.SIGKILL)  # killed mid-write: lock file and temp file stay
"""


def test_a_killed_owners_lock_and_temporary_files_are_reclaimed(tmp_path):
    run = tmp_path / "runs" / "r"
    code, _, err = train_py(tmp_path, "--max_steps", 1)
    assert code == 0, err[-2000:]
    killed = subprocess.Popen([sys.executable, "-c", KILLED_OWNER, str(run)], env=ENV)
    assert killed.wait(timeout=120) == -signal.SIGKILL
    dead = [p for p in run.glob(".checkpoint.pt.pid*.tmp")]
    assert len(dead) == 1 and (run / ".lock").exists()
    live = run / f".checkpoint.pt.pid{os.getpid()}.x.tmp"  # a live writer's file: kept
    live.write_bytes(b"being written")

    code, _, err = train_py(tmp_path, "--resume", "--max_steps", 2)
    assert code == 0, err[-2000:]
    assert f"reclaimed the stale lock of process {killed.pid} on " in err, err[-2000:]
    assert "removed 1 temporary file" in err
    assert not dead[0].exists() and live.exists() and not (run / ".lock").exists()
    assert load_checkpoint(run / "checkpoint.pt")["step"] == 2


def test_a_save_removes_only_its_own_temporary_file(tmp_path):
    from hvae.checkpoint import save_checkpoint
    import torch

    others = [tmp_path / f".checkpoint.pt.pid{os.getppid()}.abc.tmp",  # a live writer's
              tmp_path / ".checkpoint.pt.abc123.tmp"]                  # an unknown writer's
    for path in others:
        path.write_bytes(b"another writer's half checkpoint")

    class Full:  # a write that fails: this writer removes its own temporary file
        def __reduce__(self):
            raise OSError("simulated")
    with pytest.raises(OSError):
        save_checkpoint(tmp_path / "checkpoint.pt", {"config": {}, "model": {"x": Full()}})
    save_checkpoint(tmp_path / "checkpoint.pt", {"config": {}, "model": {"w": torch.ones(2)}})
    assert sorted(tmp_path.glob(".*.tmp")) == sorted(others)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["model"]["w"].sum() == 2


def test_an_error_after_the_lock_releases_it(tmp_path):
    from hvae.config import preset
    from hvae.data import DataError
    from hvae.training import train

    cfg = preset("demo", out=str(tmp_path / "runs"), name="r", batch_size=100000)
    with pytest.raises(DataError, match="smaller than one batch"):
        train(cfg, progress=False)
    assert (tmp_path / "runs" / "r").is_dir() and not (tmp_path / "runs" / "r" / ".lock").exists()


@pytest.fixture
def small_disk(tmp_path):
    """A 1.5 MiB tmpfs: room for one tiny checkpoint (1.2 MB), not for a second one."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1536k", "tmpfs", str(disk)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_a_full_disk_during_a_checkpoint_write_is_one_line(tmp_path, small_disk):
    cmd = [sys.executable, str(REPO / "train.py"), *TINY, "--out", str(small_disk), "--name", "r",
           "--max_steps", "3", "--checkpoint_every", "1"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert lines[-1].startswith("train.py: error: no space left on device while writing "), lines[-1]
    assert "the previous checkpoint.pt is unchanged" in lines[-1]
    assert "the last checkpoint is" in lines[-1] and "(step 1)" in lines[-1]
    assert "--resume" in lines[-1]
    run = small_disk / "r"
    assert load_checkpoint(run / "checkpoint.pt")["step"] == 1
    assert not list(run.glob(".*.tmp")) and not (run / ".lock").exists()


def test_no_space_inside_torch_save_names_the_disk_and_keeps_the_old_file(tmp_path, monkeypatch):
    """Without a tmpfs: the write fails the way torch.save does on a full disk (a RuntimeError
    raised while the OSError is handled)."""
    import errno
    import torch
    from hvae import checkpoint
    from hvae.checkpoint import DiskFull, save_checkpoint

    save_checkpoint(tmp_path / "checkpoint.pt", {"config": {}, "model": {"w": torch.ones(1)}})

    def full(obj, f):
        f.write(b"PK partial")
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(checkpoint.torch, "save", full)
    with pytest.raises(DiskFull, match="no space left on device while writing .* unchanged"):
        save_checkpoint(tmp_path / "checkpoint.pt", {"config": {}, "model": {}})
    with pytest.raises(DiskFull, match="nothing was written"):
        save_checkpoint(tmp_path / "other.pt", {"config": {}, "model": {}})
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "checkpoint.pt")["model"]["w"].item() == 1
    assert not list(tmp_path.glob(".*.tmp")) and not (tmp_path / "other.pt").exists()
