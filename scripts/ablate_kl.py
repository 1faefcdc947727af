"""KL ablations: one training run per variant (and seed) under one shared step budget.

    python scripts/ablate_kl.py --list
    python scripts/ablate_kl.py --preset demo --budget-minutes 5
    python scripts/ablate_kl.py --variants full,no_balance --seeds 3 --max-steps 2000
    python scripts/ablate_kl.py --preset cifar10 --budget-minutes 120 --gpus 0,1,2,3

Every Config flag (``--num_channels_enc 8`` ...) sets the base recipe; a variant's
overrides (``VARIANTS`` below) are applied on top of it.  ``--out DIR`` is the
sweep folder (default ``runs/kl_ablation_<preset>``):

    sweep.json              base config and the shared step count (reused on resume)
    runs/<variant>-s<seed>/ the run folders (checkpoint.pt, metrics.jsonl, images)
    results/<run>.json      written when a run has finished; its presence = done
    results.csv/.md         one row per variant (mean and std over seeds), runs.csv
    kl_per_group.png  active_units.png  nelbo_curves.png  (plots: pip install 'hvae[plots]')

Budget: ``--budget-minutes M`` is the training time of ONE run.  The script times
a few real training steps of the ``full`` variant (hvae.training.Trainer on the
real data) and turns M into a step count that every variant then gets, so all
runs see exactly the same batches in the same order (the data order is a pure
function of seed and epoch) with the same seeds; a variant that is slower per
step (flows, say) takes longer, but is not handicapped by seeing less data.
Evaluation (per-epoch test passes, the final importance-weighted NLL) comes on
top of M.  ``--max-steps N`` skips the calibration.  The step count is stored in
sweep.json, so a resumed sweep trains the remaining runs with the same budget.

Resume: run the same command again.  Finished runs (result JSON present) are
skipped; an unfinished run with a checkpoint continues from it.

Multi-GPU: ``--gpus 0,1,2,3`` starts one worker per GPU; each pulls runs from a
queue and trains them in a subprocess (``--run-one``) with CUDA_VISIBLE_DEVICES
set to its GPU.  Without ``--gpus`` the runs go one after another in this process.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hvae import cli  # noqa: E402
from hvae.errors import HvaeError  # noqa: E402
from hvae.config import Config, check_flags_matter, explicit_overrides, parse_args, preset  # noqa: E402

PROG = "ablate_kl.py"

# name -> Config overrides applied on top of the base recipe.  Add a line to add a variant.
VARIANTS: dict[str, dict[str, Any]] = {
    "full": {},                                                  # the recipe as configured
    "no_balance": {"kl_balance": False},                         # warm-up without balancing
    "no_warmup": {"kl_anneal_portion": 0.0, "kl_const_portion": 0.0},  # KL weight 1 from step 0
    "beta_0.5": {"kl_anneal_portion": 0.0, "kl_const_portion": 0.0, "kl_beta": 0.5},
    "beta_2": {"kl_anneal_portion": 0.0, "kl_const_portion": 0.0, "kl_beta": 2.0},
    "free_bits": {"kl_free_bits": 5.0},                          # nats per group
    "no_res_dist": {"res_dist": False},                          # plain (non-residual) posterior
    "flows": {"num_nf": 1},                                      # one IAF pair per group
    "no_flows": {"num_nf": 0},
    "mc_kl": {"kl_mc": True},                                    # Monte-Carlo KL, not analytic
}

CALIBRATION_WARMUP, CALIBRATION_STEPS = 2, 5
SCALARS = ["test_nelbo", "iw_nll_nats", "iw_nll_bpd", "test_kl", "active_units_total",
           "steps", "train_seconds", "wall_seconds"]


# ------------------------------------------------------------------ command line
def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(prog=PROG, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", action="store_true", help="print the variants and exit")
    parser.add_argument("--variants", default="all", help="comma-separated names (default: all)")
    parser.add_argument("--seeds", type=cli.integer(1), default=1,
                        help="seeds per variant: seed, seed+1, ...")
    parser.add_argument("--budget-minutes", type=cli.finite_float(0, above=True), default=None,
                        help="training minutes of one run, turned into a shared step count")
    parser.add_argument("--gpus", default="", help="e.g. 0,1,2,3: one worker process per GPU")
    parser.add_argument("--device", default=None,
                        help="device of in-process runs (default: auto); with --gpus, the "
                             "device the workers use (default cuda:0 inside each worker)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--run-one", default=None, metavar="RUN", help=argparse.SUPPRESS)
    return parser


def sweep_dir_of(config: Config, args: argparse.Namespace) -> Path:
    """--out names the sweep folder; by default one per preset under runs/."""
    return Path(config.out if args.cfg_out is not None else f"runs/kl_ablation_{config.preset}")


def select_variants(text: str) -> list[str]:
    names = list(VARIANTS) if text == "all" else [v.strip() for v in text.split(",") if v.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise cli.UsageError(f"--variants: unknown variant(s) {', '.join(unknown)}; "
                             f"known: {', '.join(VARIANTS)}")
    return names


def variant_config(base: Config, variant: str, seed: int, sweep_dir: Path) -> Config:
    """The run's config: base recipe + variant overrides, in the sweep's runs/ folder."""
    return base.replace(**VARIANTS[variant], seed=seed, name=run_name(variant, seed),
                        out=str(sweep_dir / "runs"))


def run_name(variant: str, seed: int) -> str:
    return f"{variant}-s{seed}"


def print_variants(base: Config) -> None:
    full = base.replace(**VARIANTS["full"])
    for name, overrides in VARIANTS.items():
        flags = " ".join(f"--{k} {v}" for k, v in overrides.items()) or "(no overrides)"
        same = name != "full" and base.replace(**overrides) == full
        same = " [same as full for this config]" if same else ""
        print(f"{name:12s} {flags}{same}")


# ------------------------------------------------------------------ budget
def steps_per_epoch(config: Config) -> int:
    from hvae import data as hdata
    return len(hdata.build_loader(config, "train")) // config.grad_accum_steps


def calibrate(config: Config, minutes: float, device: str | None) -> dict[str, Any]:
    """Time real training steps of the full recipe; the budget in steps is minutes / step time."""
    import torch
    from hvae.training import Trainer, init_runtime
    with tempfile.TemporaryDirectory() as tmp:  # the Trainer writes nothing here unless it saves
        trainer = Trainer(config, init_runtime(device), progress=False, run_dir=tmp)
    dev = trainer.runtime.device
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    times, batches = [], iter(trainer.train_loader)
    for _ in range(CALIBRATION_WARMUP + CALIBRATION_STEPS):
        x = [next(batches) for _ in range(config.grad_accum_steps)]  # one step's micro-batches
        sync()
        start = time.perf_counter()
        trainer.train_step(x)
        sync()
        times.append(time.perf_counter() - start)
    step_seconds = statistics.median(times[CALIBRATION_WARMUP:])
    return {"steps": max(1, int(minutes * 60 / step_seconds)), "step_seconds": step_seconds,
            "steps_per_epoch": trainer.steps_per_epoch, "device": str(dev),
            "timed_steps": CALIBRATION_STEPS}


def with_steps(config: Config, steps: int, per_epoch: int) -> Config:
    """Exactly ``steps`` optimiser steps: max_steps set, enough epochs that it is what binds."""
    return config.replace(max_steps=steps, epochs=max(config.epochs, math.ceil(steps / per_epoch)))


def load_or_make_sweep(sweep_dir: Path, requested: Config, minutes: float | None,
                       device: str | None) -> dict[str, Any]:
    """sweep.json: the base config with its step count, fixed when the sweep starts."""
    path = sweep_dir / "sweep.json"
    if path.exists():
        sweep, now = json.loads(path.read_text()), requested.to_dict()
        changed = {k: (v, now.get(k)) for k, v in sweep["requested"].items()
                   if now.get(k) != v and k != "out"}
        if changed:
            diff = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
            raise cli.UsageError(f"{sweep_dir} holds a sweep with other settings ({diff}); "
                                 "use another --out to start a new sweep")
        print(f"sweep {sweep_dir}: reusing {sweep['steps']} steps per run from sweep.json", flush=True)
        return sweep
    if requested.max_steps:
        budget = {"steps": requested.max_steps, "steps_per_epoch": steps_per_epoch(requested),
                  "source": "--max-steps"}
    elif minutes:
        print(f"calibrating: timing {CALIBRATION_STEPS} training steps of the full recipe",
              flush=True)
        budget = {**calibrate(requested.replace(**VARIANTS["full"]), minutes, device),
                  "source": "calibrated", "budget_minutes": minutes}
    else:
        raise cli.UsageError("give --budget-minutes M or --max-steps N")
    base = with_steps(requested, budget["steps"], budget["steps_per_epoch"])
    sweep = {**budget, "requested": requested.to_dict(), "base": base.to_dict()}
    sweep_dir.mkdir(parents=True, exist_ok=True)
    write_json(path, sweep)
    print(f"sweep {sweep_dir}: {budget['steps']} steps per run ({budget['source']})", flush=True)
    return sweep


# ------------------------------------------------------------------ one run
def result_path(sweep_dir: Path, name: str) -> Path:
    return sweep_dir / "results" / f"{name}.json"


def write_json(path: Path, value: Any) -> None:
    """Atomic, so that a killed sweep never leaves a half result that counts as finished."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=1) + "\n")
    os.replace(tmp, path)


def run_one(sweep_dir: Path, sweep: dict, variant: str, seed: int, device: str | None,
            progress: bool) -> dict[str, Any]:
    """Train (or resume) one run and write its result JSON."""
    from hvae.training import train
    config = variant_config(Config.from_dict(sweep["base"]), variant, seed, sweep_dir)
    run_dir = Path(config.out) / config.run_name
    checkpoint = run_dir / "checkpoint.pt"
    resume = checkpoint if checkpoint.exists() else None
    if resume is None and (run_dir / "metrics.jsonl").exists():
        (run_dir / "metrics.jsonl").unlink()  # stale log of a run that never checkpointed
    print(f"run {config.run_name}: {'resuming' if resume else 'training'}", flush=True)
    start = time.time()
    summary = train(config, resume=resume, progress=progress, device=device)
    result = {"run": config.run_name, "variant": variant, "seed": seed,
              "overrides": VARIANTS[variant], "resumed": resume is not None,
              "wall_seconds": time.time() - start, **summary}
    write_json(result_path(sweep_dir, config.run_name), result)
    return result


def run_sequential(sweep_dir: Path, sweep: dict, todo: list[tuple[str, int]],
                   device: str | None, progress: bool) -> None:
    """In this process, one after another; a failed run is reported and retried next time.
    A stop signal (``Interrupted``) ends the sweep after the run in progress saves."""
    from hvae.runtime import Interrupted

    for variant, seed in todo:
        try:
            run_one(sweep_dir, sweep, variant, seed, device, progress)
        except (KeyboardInterrupt, SystemExit, Interrupted):
            raise
        except HvaeError as err:  # the run's own one-line reason
            print(f"run {run_name(variant, seed)} FAILED: {cli.one_line(err)}", flush=True)
        except Exception:  # noqa: BLE001 - one broken variant must not stop the sweep
            print(f"run {run_name(variant, seed)} FAILED:\n{traceback.format_exc()}", flush=True)


def run_parallel(sweep_dir: Path, todo: list[tuple[str, int]], gpus: list[str],
                 device: str | None) -> None:
    """One worker thread per GPU, each training queued runs in a subprocess on its GPU."""
    jobs: queue.Queue = queue.Queue()
    for item in todo:
        jobs.put(item)

    def worker(gpu: str) -> None:
        while True:
            try:
                variant, seed = jobs.get_nowait()
            except queue.Empty:
                return
            name = run_name(variant, seed)
            log = sweep_dir / "runs" / f"{name}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, str(Path(__file__).resolve()), "--out", str(sweep_dir),
                   "--run-one", f"{variant}:{seed}", "--device", device or "cuda:0",
                   "--no-progress"]
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpu}
            print(f"gpu {gpu}: run {name} (log {log})", flush=True)
            with open(log, "a") as f:
                start = f.tell()
                rc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
            status = "done" if rc == 0 else f"FAILED (exit {rc}): {last_error(log, start)}"
            print(f"gpu {gpu}: run {name} {status}", flush=True)

    threads = [threading.Thread(target=worker, args=(g,), daemon=True) for g in gpus]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def last_error(log: Path, start: int = 0) -> str:
    """Why a worker's run failed, from its log (written after ``start``): its one-line
    error, else the last line (a traceback's), with the log's path."""
    with open(log, "rb") as f:
        f.seek(start)
        lines = [l.strip() for l in f.read().decode(errors="replace").splitlines() if l.strip()]
    reason = next((l for l in reversed(lines) if ": error: " in l), lines[-1] if lines else
                  "no output")
    return f"{reason} (log {log})"


# ------------------------------------------------------------------ reporting
def read_curve(run_dir: Path) -> tuple[list[int], list[float], list[float] | None]:
    """Train NELBO per logged step (last entry wins after a resume) and the last KL per group."""
    path = run_dir / "metrics.jsonl"
    by_step: dict[int, dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            row = json.loads(line) if line.strip() else {}
            if row.get("split") == "train" and "nelbo" in row:
                by_step[row["step"]] = row
    steps = sorted(by_step)
    last = by_step[steps[-1]].get("kl_groups") if steps else None
    return steps, [by_step[s]["nelbo"] for s in steps], last


def mean_std(values: list[float]) -> tuple[float, float]:
    values = [float(v) for v in values]
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def mean_lists(lists: list[list[float]]) -> list[float]:
    lists = [l for l in lists if l]
    return [statistics.fmean(col) for col in zip(*lists)] if lists else []


def summarise(results: list[dict], sweep_dir: Path) -> list[dict]:
    """One row per variant: mean and std over seeds of each scalar, per-group means."""
    rows = []
    for variant in dict.fromkeys(r["variant"] for r in results):
        runs = [r for r in results if r["variant"] == variant]
        row: dict[str, Any] = {"variant": variant, "seeds": len(runs)}
        for key in SCALARS:
            row[key], row[f"{key}_std"] = mean_std([r.get(key, math.nan) for r in runs])
        row["active_units"] = mean_lists([r.get("active_units", []) for r in runs])
        # test KL per group (EMA weights), or the last training log for older results
        row["kl_groups"] = mean_lists([r.get("test_kl_groups")
                                       or read_curve(sweep_dir / "runs" / r["run"])[2] or []
                                       for r in runs])
        rows.append(row)
    return rows


def fmt_list(values: list[float]) -> str:
    return "/".join(f"{v:g}" if float(v).is_integer() else f"{v:.2f}" for v in values)


def write_tables(rows: list[dict], results: list[dict], sweep_dir: Path, sweep: dict) -> None:
    columns = ["variant", "seeds"] + [c for k in SCALARS for c in (k, f"{k}_std")]
    with open(sweep_dir / "results.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns + ["active_units_per_group", "train_kl_per_group", "overrides"])
        for row in rows:
            writer.writerow([row[c] for c in columns] + [
                fmt_list(row["active_units"]), fmt_list(row["kl_groups"]),
                json.dumps(VARIANTS.get(row["variant"], {}))])
    with open(sweep_dir / "runs.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", "variant", "seed"] + SCALARS + ["active_units_per_group"])
        for r in results:
            writer.writerow([r["run"], r["variant"], r["seed"]] + [r.get(k) for k in SCALARS]
                            + [fmt_list(r.get("active_units", []))])
    (sweep_dir / "results.md").write_text(markdown_table(rows, sweep))


def markdown_table(rows: list[dict], sweep: dict) -> str:
    def pm(row, key, digits):
        mean, std = row[key], row[f"{key}_std"]
        return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if row["seeds"] > 1 else "")

    base = sweep["base"]
    lines = [f"KL ablations: preset `{base['preset']}`, {sweep['steps']} steps per run "
             f"({sweep['source']}), batch {base['batch_size']}, IW samples {base['num_iw_samples']}; "
             "mean ± std over seeds where there are several.", "",
             "| variant | seeds | test NELBO (nats) | IW NLL (nats) | IW NLL (bits/dim) | KL (nats) "
             "| active units per group | active units | steps | wall (s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['seeds']} | {pm(r, 'test_nelbo', 2)} | "
                     f"{pm(r, 'iw_nll_nats', 2)} | {pm(r, 'iw_nll_bpd', 4)} | {pm(r, 'test_kl', 2)} | "
                     f"{fmt_list(r['active_units'])} | {pm(r, 'active_units_total', 1)} | "
                     f"{r['steps']:.0f} | {pm(r, 'wall_seconds', 0)} |")
    return "\n".join(lines) + "\n"


def write_plots(rows: list[dict], results: list[dict], sweep_dir: Path) -> None:
    try:
        import matplotlib
    except ImportError:  # the tables are written all the same
        print(f"{PROG}: plots not drawn: they need matplotlib: pip install 'hvae[plots]'",
              file=sys.stderr, flush=True)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    grouped_bars(plt, rows, "kl_groups", "test KL per group (nats)",
                 sweep_dir / "kl_per_group.png")
    grouped_bars(plt, rows, "active_units", "active latent units per group (test)",
                 sweep_dir / "active_units.png")
    fig, ax = plt.subplots(figsize=(8, 5))
    colours = {row["variant"]: f"C{i % 10}" for i, row in enumerate(rows)}
    labelled, later = set(), []
    for r in results:
        steps, nelbo, _ = read_curve(sweep_dir / "runs" / r["run"])
        label = None if r["variant"] in labelled else r["variant"]
        labelled.add(r["variant"])
        ax.plot(steps, nelbo, color=colours[r["variant"]], label=label, lw=1,
                marker="." if len(steps) < 20 else None)
        later += nelbo[len(nelbo) // 10:]
    if later:  # the first steps' NELBO is far above the rest and would flatten the curves
        low, high = min(later), max(later)
        ax.set_ylim(low - 0.02 * (high - low) - 1e-3, high + 0.02 * (high - low) + 1e-3)
    ax.set(xlabel="step", ylabel="training NELBO (nats)", title="training NELBO (one line per run)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(sweep_dir / "nelbo_curves.png", dpi=120)
    plt.close(fig)


def grouped_bars(plt, rows: list[dict], key: str, title: str, path: Path) -> None:
    """Bars per latent group (top group first), one colour per variant."""
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 1.2), 4.5))
    width = 0.8 / max(len(rows), 1)
    for i, row in enumerate(rows):
        values = row[key]
        ax.bar([g + (i - (len(rows) - 1) / 2) * width for g in range(len(values))], values,
               width=width, label=row["variant"], color=f"C{i % 10}")
    ax.set_xticks(range(max((len(r[key]) for r in rows), default=0)))
    ax.set(xlabel="latent group (top first)", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(sweep_dir: Path, sweep: dict, plan: list[tuple[str, int]]) -> list[dict]:
    """Tables and plots over the planned runs that have finished."""
    results = [json.loads(p.read_text()) for p in
               (result_path(sweep_dir, run_name(v, s)) for v, s in plan) if p.exists()]
    missing = len(plan) - len(results)
    if missing:
        print(f"{missing} run(s) have not finished; run the same command again to resume",
              flush=True)
    if not results:
        return []
    rows = summarise(results, sweep_dir)
    write_tables(rows, results, sweep_dir, sweep)
    write_plots(rows, results, sweep_dir)
    print((sweep_dir / "results.md").read_text(), flush=True)
    return rows


# ------------------------------------------------------------------ main
def plan_runs(base: Config, variants: list[str], seeds: list[int],
              explicit: bool) -> list[tuple[str, int]]:
    """(variant, seed) pairs; by default a variant that equals ``full`` here is left out."""
    full = base.replace(**VARIANTS["full"])
    keep = []
    for v in variants:
        if not explicit and v != "full" and base.replace(**VARIANTS[v]) == full:
            print(f"variant {v} is the same as full for this config: not run", flush=True)
            continue
        keep.append(v)
    return [(v, s) for v in keep for s in seeds]


@cli.entry_point(PROG)  # bad input (arguments, config, data ...): one line, exit code 2
def main(argv: list[str] | None = None) -> int:
    config, args = parse_args(argv, build_parser())
    unused = {"name": "each run's folder is named after its variant and seed (--out names "
                      "the sweep folder)"}
    check_flags_matter(config, explicit_overrides(args), preset(config.preset), unused)
    if args.budget_minutes and config.max_steps:
        raise cli.UsageError("give --budget-minutes or --max-steps, not both (both set the "
                             "step count of every run)")
    if args.list:
        print_variants(config)
        return 0
    sweep_dir = sweep_dir_of(config, args)
    if args.run_one:  # a worker subprocess of --gpus: everything else comes from sweep.json
        variant, seed = args.run_one.rsplit(":", 1)
        sweep = json.loads((sweep_dir / "sweep.json").read_text())
        run_one(sweep_dir, sweep, variant, int(seed), cli.parse_device(args.device),
                not args.no_progress)
        return 0
    variants = select_variants(args.variants)
    gpus = [g.strip() for g in args.gpus.split(",") if g.strip()]
    if not gpus:  # runs in this process: the device must exist here (workers check their own)
        args.device = cli.parse_device(args.device)
    calib_device = args.device or (f"cuda:{gpus[0]}" if gpus else None)
    sweep = load_or_make_sweep(sweep_dir, config, args.budget_minutes, calib_device)
    base = Config.from_dict(sweep["base"])
    seeds = [config.seed + i for i in range(args.seeds)]
    plan = plan_runs(base, variants, seeds, explicit=args.variants != "all")
    todo = []
    for variant, seed in plan:
        if result_path(sweep_dir, run_name(variant, seed)).exists():
            print(f"run {run_name(variant, seed)}: finished, skipped", flush=True)
        else:
            todo.append((variant, seed))
    if todo and gpus:
        run_parallel(sweep_dir, todo, gpus, args.device)
    elif todo:
        from hvae.runtime import Interrupted
        try:
            run_sequential(sweep_dir, sweep, todo, args.device, not args.no_progress)
        except Interrupted as stop:  # SIGTERM / Ctrl-C: the run in progress saved its checkpoint
            print("sweep stopped; run the same command again to resume it", flush=True)
            return stop.exit_code
    rows = report(sweep_dir, sweep, plan)
    finished = all(result_path(sweep_dir, run_name(v, s)).exists() for v, s in plan)
    return 0 if rows and finished else 1


if __name__ == "__main__":
    sys.exit(main())
