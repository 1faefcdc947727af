"""A run folder belongs to one run: a new run never replaces another's files, and one
live process at a time writes into it.

    with claim_run_folder(run_dir, resume=None, overwrite=False):   # rank 0 only
        ... train ...

- A new run into a folder that already holds a run's record (``checkpoint.pt``,
  ``checkpoint_best.pt``, ``metrics.jsonl``) stops with an error that names
  ``--resume`` and ``--name`` / ``--overwrite``; ``overwrite=True`` removes that
  run's files first.
- ``LOCK`` holds the pid and host of the process that owns the folder, under an
  exclusive ``flock``: the kernel drops the lock when the process ends, however it
  ends, so a lock file whose lock is free is stale (its process died, e.g. kill -9)
  and is reclaimed with a message.  The owner deletes the file on every exit it
  sees (normal, error, signal).
- Temporary checkpoint files carry their writer's pid (``temp_prefix``): each writer
  removes its own; the folder's owner removes those of writers that no longer run.

Nothing here imports torch, so these checks stay instant.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import sys
from pathlib import Path
from typing import Iterator

try:
    import fcntl
except ImportError:  # not POSIX: folders are checked but not locked
    fcntl = None

from hvae.errors import HvaeError

LOCK = ".lock"
RECORD = ("checkpoint.pt", "checkpoint_best.pt", "metrics.jsonl")  # what makes a folder a run's
OUTPUTS = (*RECORD, "config.json", "tensorboard", "reconstructions.png", "samples_t*.png")
_TEMP = re.compile(r"^\..+\.pid(\d+)\.[^.]+\.tmp$")  # .checkpoint.pt.pid1234.x8k2.tmp


class RunFolderError(HvaeError, RuntimeError):
    """A run folder that holds another run, or that another live process is writing."""


def temp_prefix(path: Path) -> str:
    """Prefix of this process's temporary file for ``path`` (the pid says whose it is)."""
    return f".{path.name}.pid{os.getpid()}."


def check_new_run(run_dir: Path, resume: str | os.PathLike | None, overwrite: bool) -> None:
    """Refuse to start a run that would replace another run's files in ``run_dir``."""
    if overwrite and resume:
        raise RunFolderError("--overwrite starts a new run and --resume continues one: give one")
    found = [name for name in RECORD if (run_dir / name).exists()]
    if not found or overwrite:
        return
    if resume and _inside(Path(resume), run_dir):
        return  # continuing the run that owns the folder
    what = f"a run ({', '.join(found)})"
    if resume:
        raise RunFolderError(
            f"run folder {str(run_dir)!r} already holds {what}: continuing {str(resume)!r} there "
            "would replace it; continue that folder's run with --resume (no file), give "
            "another --name, or --overwrite true to replace it")
    raise RunFolderError(
        f"run folder {str(run_dir)!r} already holds {what}: continue that run with --resume, "
        "or start a new one with another --name (or --overwrite true to replace it)")


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().parent == folder.resolve()


def clear_run(run_dir: Path) -> list[str]:
    """Remove the files a run writes (not the lock, not anything else); their names."""
    removed = []
    for pattern in OUTPUTS:
        for path in sorted(run_dir.glob(pattern)):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path.name)
    return removed


class RunLock:
    """The exclusive lock of one run folder, held by this process (see the module doc)."""

    def __init__(self, run_dir: Path):
        self.run_dir, self.path, self.fd = Path(run_dir), Path(run_dir) / LOCK, None

    def acquire(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if fcntl is None:
            return
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _read(fd) or "another process"
                os.close(fd)
                raise RunFolderError(
                    f"run folder {str(self.run_dir)!r} is in use by {holder} (lock file "
                    f"{self.path}): wait for that run to end or stop it, or give another "
                    "--name") from None
            try:  # the previous owner may have deleted the file between our open and flock
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        stale = _read(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self.fd = fd
        removed = remove_dead_temp_files(self.run_dir)
        if stale:
            print(f"run folder {str(self.run_dir)!r}: reclaimed the stale lock of {stale}, which "
                  f"no longer runs" + (f"; removed {removed} temporary file(s) of its unfinished "
                                       "writes" if removed else ""), file=sys.stderr, flush=True)

    def release(self) -> None:
        """Delete the lock file, then drop the lock (in that order: no one can lock a
        file that is about to disappear)."""
        if self.fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        os.close(self.fd)
        self.fd = None


def _read(fd: int) -> str:
    return os.pread(fd, 512, 0).decode(errors="replace").strip()


def remove_dead_temp_files(folder: Path) -> int:
    """Remove temporary files whose writer (by the pid in the name) no longer runs."""
    removed = 0
    for path in folder.glob(".*.tmp"):
        match = _TEMP.match(path.name)
        if match and not _running(int(match.group(1))):
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


@contextlib.contextmanager
def claim_run_folder(run_dir: str | os.PathLike, resume: str | os.PathLike | None = None,
                     overwrite: bool = False) -> Iterator[None]:
    """Own ``run_dir`` for the block: lock it, refuse to replace another run, and with
    ``overwrite`` remove that run's files first; the lock goes on any exit."""
    run_dir = Path(run_dir)
    lock = RunLock(run_dir)
    lock.acquire()
    try:
        check_new_run(run_dir, resume, overwrite)
        if overwrite:
            removed = clear_run(run_dir)
            if removed:
                print(f"run folder {str(run_dir)!r}: --overwrite: removed the earlier run's "
                      f"{', '.join(removed)}", file=sys.stderr, flush=True)
        yield
    finally:
        lock.release()
