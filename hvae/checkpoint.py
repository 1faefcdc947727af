"""Checkpoints that are written atomically and fail loudly when they are damaged.

A checkpoint is a plain dict of tensors and Python values (no pickled objects), so
``torch.load(weights_only=True)`` reads it and a checkpoint can never run code.
``Checkpointer`` is the one place that knows the layout of a training checkpoint:

    format, config (dict), model, ema (or None), optimizer, scheduler, scaler,
    spectral, grad_skip, rng, step, epoch, data_position {epoch, batch}, best,
    heal (the self-healing history: ``hvae.healing``)
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from hvae.errors import HvaeError, RunFailed, exhausted
from hvae.run_folder import temp_prefix
from hvae.runtime import rng_state, seed_everything, set_rng_state

FORMAT = "hvae-checkpoint-v1"


class CheckpointError(HvaeError, RuntimeError):
    """A checkpoint file that is missing, unreadable, truncated or from another program."""


class DiskFull(RunFailed):
    """A checkpoint write that ran out of disk space (the earlier file is kept)."""


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` via a temporary file and an atomic rename.

    A crash mid-write leaves the previous checkpoint at ``path`` untouched.  The
    temporary file's name carries this process's pid: only its writer removes it
    (and, after a crash, the next run that owns the folder: ``hvae.run_folder``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if exhausted(err) == "disk space":
            free = shutil.disk_usage(path.parent).free / 2**20
            kept = f"the previous {path.name} is unchanged" if path.exists() else "nothing was written"
            raise DiskFull(f"no space left on device while writing {path} ({free:.1f} MiB free "
                           f"there); {kept}") from err
        raise


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint``, with an error that says what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated zip, wrong file type, pickled objects ...
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupt or not an hvae checkpoint "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
            "an earlier checkpoint (e.g. checkpoint_best.pt) may still be intact") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"checkpoint {str(path)!r} has format {found!r}, expected {FORMAT!r}")
    for key in ("config", "model"):
        if key not in state:
            raise CheckpointError(f"checkpoint {str(path)!r} lacks the {key!r} entry")
    if isinstance(state["config"], dict):
        from hvae.config import Config
        state["config"] = Config.upgrade_saved(state["config"])
    return state


def load_model(path: str | os.PathLike, use_ema: bool = True, device: Any = "cpu",
               state: dict[str, Any] | None = None):
    """Rebuild the model of a checkpoint in eval mode: ``(model, config)``.

    ``use_ema`` picks the exponential moving average of the weights when the run kept one.
    ``state``: the checkpoint already read by ``load_checkpoint(path)`` (read once).
    """
    from hvae.config import Config
    from hvae.model import NVAE

    state = load_checkpoint(path) if state is None else state
    config = Config.from_dict(state["config"])
    model = NVAE(config)
    weights = state["ema"] if use_ema and state.get("ema") is not None else state["model"]
    try:
        model.load_state_dict(weights)
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not match the model its config describes: "
            f"{describe_mismatch(model, weights, error=err)}") from err
    return model.to(device).eval(), config


def saved_config(path: str | os.PathLike) -> dict[str, Any]:
    """The config dict stored in a checkpoint."""
    return load_checkpoint(path)["config"]


TRAINING_KEYS = ("model", "optimizer", "spectral", "grad_skip", "rng", "step", "data_position",
                 "best")


class Checkpointer:
    """Writes and restores the complete state of a training run (see the module docstring).

    ``run`` is the object that holds the parts (duck-typed: ``config``, ``model``,
    ``ema``, ``optimizer``, ``scaler``, ``spectral``, ``skipper``, ``schedule``,
    ``healer`` and the counters ``step``, ``epoch``, ``batch_in_epoch``, ``best``).
    Only the main process writes.
    """

    def __init__(self, run_dir: str | os.PathLike, enabled: bool = True):
        self.run_dir, self.enabled = Path(run_dir), enabled

    @staticmethod
    def state(run) -> dict[str, Any]:
        return {"config": run.config.to_dict(), "model": run.model.state_dict(),
                "ema": run.ema.model.state_dict() if run.ema else None,
                "optimizer": run.optimizer.state_dict(),
                "scheduler": {"step": run.step, "total_steps": run.schedule.total_steps,
                              "warmup_steps": run.schedule.lr_warmup_steps},
                "scaler": run.scaler.state_dict(), "spectral": run.spectral.state_dict(),
                "grad_skip": run.skipper.state_dict(), "rng": rng_state(),
                "step": run.step, "epoch": run.epoch,
                "data_position": {"epoch": run.epoch, "batch": run.batch_in_epoch},
                "best": run.best, "heal": run.healer.state_dict()}

    def save(self, run, name: str = "checkpoint.pt", state: dict[str, Any] | None = None) -> None:
        """Write ``run``'s state (or ``state``, already taken) as ``name``."""
        if self.enabled:
            save_checkpoint(self.run_dir / name, self.state(run) if state is None else state)

    @staticmethod
    def restore(run, path: str | os.PathLike, rank: int = 0) -> None:
        """Load ``path`` into ``run``; rank 0 restores the RNG states, other ranks
        reseed reproducibly (their noise streams differ from rank 0's anyway)."""
        # on the CPU: the RNG states must stay there, and load_state_dict moves the
        # weights, buffers and optimiser state onto the run's device
        state = load_checkpoint(path, map_location="cpu")
        missing = [k for k in TRAINING_KEYS if k not in state]
        if missing and state.get("imported"):
            Checkpointer._start_from_imported(run, path, state)
            return
        if missing:
            raise CheckpointError(f"checkpoint {str(path)!r} cannot resume training: it lacks "
                                  f"{', '.join(missing)} (weights only? evaluate it with "
                                  "evaluate.py, or start a new run)")
        Checkpointer.load_state(run, state, path, rank)
        if state.get("heal"):  # older checkpoints: no heal yet
            run.healer.load_state_dict(state["heal"])

    @staticmethod
    def load_state(run, state: dict[str, Any], path: str | os.PathLike, rank: int = 0,
                   own_rng: bool = False) -> None:
        """Load a training state (read from ``path``, or a heal's good state) into ``run``.
        ``own_rng``: the state holds this process's own RNG states (a heal's, on every
        rank); otherwise ranks other than 0 reseed."""
        try:
            run.model.load_state_dict(state["model"])
            if run.ema is not None and state.get("ema") is not None:
                run.ema.model.load_state_dict(state["ema"])
            run.optimizer.load_state_dict(state["optimizer"])
            run.spectral.load_state_dict(state["spectral"])
            run.skipper.load_state_dict(state["grad_skip"])
        except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise CheckpointError(f"checkpoint {str(path)!r} does not fit this config: "
                                  + describe_mismatch(run.model, state["model"], state["config"],
                                                      run.config, error=err)) from err
        if state.get("scaler"):
            run.scaler.load_state_dict(state["scaler"])
        run.step, run.best = int(state["step"]), float(state["best"])
        run.epoch = int(state["data_position"]["epoch"])
        run.batch_in_epoch = Checkpointer._batches_done(run, state, path)
        if rank == 0 or own_rng:
            set_rng_state(state["rng"])
        else:
            seed_everything(run.config.seed + rank + 1000 * run.step)

    @staticmethod
    def _batches_done(run, state: dict[str, Any], path) -> int:
        """The loader batches of the current epoch already trained, counted in this
        run's batch size: the checkpoint's count converted exactly (a finished epoch
        stays finished), or an error when the position falls inside a batch."""
        done, epoch = int(state["data_position"]["batch"]), int(state["data_position"]["epoch"])
        saved, size = int(state["config"].get("batch_size", run.config.batch_size)), run.config.batch_size
        if saved == size or done == 0:
            return done
        accum = int(state["config"].get("grad_accum_steps", 1))
        if done >= len(run.train_loader.sampler) // saved // accum * accum:
            return run.steps_per_epoch * run.accum  # the epoch was complete
        images = done * saved
        if images % size:
            raise CheckpointError(
                f"checkpoint {str(path)!r} stopped {images} images into epoch {epoch} "
                f"(batch_size {saved}), which is not a whole number of batches of "
                f"--batch_size {size}: resume with --batch_size {saved}, or one that "
                f"divides {images}")
        return images // size

    @staticmethod
    def _start_from_imported(run, path, state) -> None:
        """Fine-tuning from imported weights (``scripts/import_nvae.py``): the weights
        (and the EMA, from them) carry over; optimiser, schedule, spectral vectors and
        gradient-skip history start fresh at step 0, as the message says."""
        import sys

        try:
            run.model.load_state_dict(state["model"])
            if run.ema is not None:
                run.ema.model.load_state_dict(state["model"])
        except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise CheckpointError(f"checkpoint {str(path)!r} does not fit this config: "
                                  + describe_mismatch(run.model, state["model"], state["config"],
                                                      run.config, error=err)) from err
        source = state["imported"].get("from", "elsewhere") if isinstance(state["imported"], dict) else "elsewhere"
        print(f"resuming from weights imported from {source} ({path}): fresh optimiser, learning-rate "
              "schedule and gradient statistics, starting at step 0", file=sys.stderr, flush=True)


def describe_mismatch(model: torch.nn.Module, state_dict: Any, saved_config: Any = None,
                      config: Any = None, error: BaseException | None = None) -> str:
    """Why ``state_dict`` does not load into ``model``, in one line: the first mismatching
    entry (name and both shapes, or which side lacks it), how many entries differ, and
    the fields in which ``saved_config`` (the checkpoint's) and ``config`` (the model's)
    differ.  Configs may be ``Config`` objects or dicts.  Falls back to the first line of
    ``error`` when the parameters themselves match (e.g. an optimizer state that does not)."""
    parts: list[str] = []
    if isinstance(state_dict, dict):
        mine = model.state_dict()
        shape = lambda t: list(getattr(t, "shape", ()))  # noqa: E731
        differ = [(k, "shape") for k in mine if k in state_dict and shape(mine[k]) != shape(state_dict[k])]
        differ += [(k, "missing") for k in mine if k not in state_dict]
        differ += [(k, "extra") for k in state_dict if k not in mine]
        if differ:
            order: dict[str, int] = {}
            for k in [*mine, *state_dict]:  # the model's order, then the checkpoint's extras
                order.setdefault(k, len(order))
            name, kind = min(differ, key=lambda d: order[d[0]])
            if kind == "shape":
                first = (f"parameter {name!r} has shape {shape(state_dict[name])} in the checkpoint "
                         f"but {shape(mine[name])} in the model")
            elif kind == "missing":
                first = f"the checkpoint has no parameter {name!r}, which the model needs"
            else:
                first = f"the checkpoint has a parameter {name!r} that the model does not have"
            more = len(differ) - 1
            parts.append(first + (f" ({more} more entr{'y' if more == 1 else 'ies'} differ)"
                                  if more else ""))
    else:
        parts.append(f"the weights are {type(state_dict).__name__}, not a dict of tensors")
    mismatch = bool(parts)
    if not parts and error is not None:  # the parameters fit: say what did not
        if isinstance(error, KeyError):
            parts.append(f"it lacks the {error.args[0]!r} entry")
        else:
            line = next((l.strip() for l in str(error).splitlines() if l.strip()), "")
            parts.append(f"{type(error).__name__}: {line}" if line else type(error).__name__)
    if saved_config is not None and config is not None:
        old, new = _as_dict(saved_config), _as_dict(config)
        fields = [k for k in new if k in old and old[k] != new[k]]
        if fields:
            shown = ", ".join(f"{k} (checkpoint {old[k]!r}, now {new[k]!r})" for k in fields[:8])
            parts.append("the configs differ in " + shown
                         + (f" and {len(fields) - 8} more" if len(fields) > 8 else ""))
        elif mismatch:
            parts.append("the configs agree, so the weights were written by another architecture")
    return "; ".join(parts)


def _as_dict(config: Any) -> dict[str, Any]:
    return dict(config) if isinstance(config, dict) else config.to_dict()
