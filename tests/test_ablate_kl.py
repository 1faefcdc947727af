"""Tests of scripts/ablate_kl.py: a real tiny sweep, skip-on-resume, resume, multi-GPU queue."""
import csv
import functools
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--num_channels_enc", "8", "--num_channels_dec", "8", "--num_groups_per_scale", "2",
        "--num_latent_per_group", "4", "--batch_size", "16", "--num_iw_samples", "2",
        "--eval_batches", "2", "--log_every", "1", "--no-progress"]


def load_script():
    spec = importlib.util.spec_from_file_location("ablate_kl", ROOT / "scripts" / "ablate_kl.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def ablate():
    return load_script()


def fake_train(calls):
    """Stands in for hvae.training.train: records the call, logs two steps, returns a summary."""
    def train(config, resume=None, progress=True, stop_at_step=None, device=None):
        calls.append((config.run_name, resume, device))
        run_dir = Path(config.out) / config.run_name
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "metrics.jsonl", "a") as f:
            for step in (1, 2):
                f.write(json.dumps({"split": "train", "step": step, "epoch": 0, "time": 0.0,
                                    "nelbo": 100.0 - step, "kl_groups": [1.0, 2.0, 0.0]}) + "\n")
        groups = [2, 1, 0] if config.kl_balance else [2, 0, 0]
        return {"test_nelbo": 99.0, "test_recon": 96.0, "test_kl": 3.0, "test_bpd": 0.18,
                "active_units": groups, "active_units_total": sum(groups),
                "iw_nll_nats": 98.0 + config.seed, "iw_nll_bpd": 0.18, "steps": config.max_steps,
                "train_seconds": 1.0, "images_per_second": 10.0, "skipped_steps": 0}
    return train


def test_list_names_every_variant(ablate, capsys):
    assert ablate.main(["--list"]) == 0
    out = capsys.readouterr().out
    for name in ablate.VARIANTS:
        assert name in out
    assert {"full", "no_balance", "no_warmup", "beta_0.5", "beta_2", "free_bits", "no_res_dist",
            "flows", "no_flows", "mc_kl"} <= set(ablate.VARIANTS)


def test_tiny_sweep_on_bundled_data_then_skips_finished_runs(ablate, tmp_path, monkeypatch, capsys):
    import hvae.evaluation
    import hvae.training
    # The final IW NLL normally covers the whole test split; two batches keep this test fast.
    monkeypatch.setattr(hvae.evaluation, "iw_log_likelihood",
                        functools.partial(hvae.evaluation.iw_log_likelihood, max_batches=2))
    argv = ["--variants", "full,no_balance", "--max-steps", "2", "--out", str(tmp_path)] + TINY
    assert ablate.main(argv) == 0

    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert [r["variant"] for r in rows] == ["full", "no_balance"]
    for r in rows:
        assert float(r["steps"]) == 2
        assert len(r["active_units_per_group"].split("/")) == 3  # ada groups: 1 + 2
    # The table holds the library's numbers: training the full variant's config directly
    # (same seed, same step budget) gives the same test NELBO, KL, IW NLL and units.
    from hvae.config import Config
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    config = ablate.variant_config(Config.from_dict(sweep["base"]), "full", 1, tmp_path / "direct")
    direct = hvae.training.train(config, progress=False)
    result = json.loads((tmp_path / "results" / "full-s1.json").read_text())
    for key in ("test_nelbo", "test_kl", "iw_nll_nats", "iw_nll_bpd", "iw_nelbo_nats",
                "active_units_total", "steps"):
        assert result[key] == pytest.approx(direct[key], rel=1e-6), key
        if key in rows[0]:
            assert float(rows[0][key]) == pytest.approx(direct[key], rel=1e-6), key
    assert rows[0]["active_units_per_group"] == ablate.fmt_list(direct["active_units"])
    assert direct["iw_num_samples"] == 2 and direct["iw_num_images"] == 2 * 16
    md = (tmp_path / "results.md").read_text()
    assert "| full |" in md and "| no_balance |" in md
    for png in ("kl_per_group.png", "active_units.png", "nelbo_curves.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "sweep.json").read_text())["steps"] == 2

    results = sorted((tmp_path / "results").glob("*.json"))
    mtimes = [p.stat().st_mtime_ns for p in results]
    monkeypatch.setattr(hvae.training, "train", lambda *a, **k: pytest.fail("trained again"))
    capsys.readouterr()
    assert ablate.main(argv) == 0
    assert "full-s1: finished, skipped" in capsys.readouterr().out
    assert [p.stat().st_mtime_ns for p in results] == mtimes


def test_unfinished_run_resumes_from_its_checkpoint(ablate, tmp_path, monkeypatch):
    import hvae.training
    calls = []
    monkeypatch.setattr(hvae.training, "train", fake_train(calls))
    checkpoint = tmp_path / "runs" / "no_warmup-s1" / "checkpoint.pt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"stand-in")
    argv = ["--variants", "full,no_warmup", "--max-steps", "5", "--out", str(tmp_path)] + TINY
    assert ablate.main(argv) == 0
    assert calls == [("full-s1", None, None), ("no_warmup-s1", checkpoint, None)]
    result = json.loads((tmp_path / "results" / "no_warmup-s1.json").read_text())
    assert result["resumed"] and result["steps"] == 5


def test_seeds_give_mean_and_std(ablate, tmp_path, monkeypatch):
    import hvae.training
    monkeypatch.setattr(hvae.training, "train", fake_train([]))
    argv = ["--variants", "full", "--seeds", "2", "--max-steps", "5", "--out", str(tmp_path)] + TINY
    assert ablate.main(argv) == 0
    row = next(csv.DictReader(open(tmp_path / "results.csv")))
    assert row["seeds"] == "2"
    assert float(row["iw_nll_nats"]) == pytest.approx(99.5)   # seeds 1 and 2: 99, 100
    assert float(row["iw_nll_nats_std"]) == pytest.approx(0.5 ** 0.5)
    assert "±" in (tmp_path / "results.md").read_text()


def test_without_matplotlib_the_tables_are_written_and_one_line_says_why_no_plots(
        ablate, tmp_path, monkeypatch, capsys):
    import sys
    import hvae.training
    monkeypatch.setattr(hvae.training, "train", fake_train([]))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    argv = ["--variants", "full", "--max-steps", "5", "--out", str(tmp_path)] + TINY
    assert ablate.main(argv) == 0
    assert (tmp_path / "results.md").exists() and (tmp_path / "results.csv").exists()
    assert not list(tmp_path.glob("*.png"))
    err = [line for line in capsys.readouterr().err.splitlines() if "matplotlib" in line]
    assert err == ["ablate_kl.py: plots not drawn: they need matplotlib: "
                   "pip install 'hvae[plots]'"]


def test_budget_is_fixed_by_the_first_invocation(ablate, tmp_path, monkeypatch, capsys):
    import hvae.training
    monkeypatch.setattr(hvae.training, "train", fake_train([]))
    argv = ["--variants", "full", "--max-steps", "5", "--out", str(tmp_path)] + TINY
    assert ablate.main(argv) == 0
    capsys.readouterr()
    for bad, needle in ((argv[:3] + ["6"] + argv[4:], "other settings"),
                        (["--out", str(tmp_path / "new")] + TINY, "--budget-minutes")):
        with pytest.raises(SystemExit) as exc:  # one line on stderr, exit code 2
            ablate.main(bad)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.startswith("ablate_kl.py: error: ") and needle in err


def test_calibration_turns_minutes_into_steps(ablate, monkeypatch):
    from hvae.config import preset
    monkeypatch.setattr(ablate, "CALIBRATION_WARMUP", 0)
    monkeypatch.setattr(ablate, "CALIBRATION_STEPS", 1)
    config = preset("demo", num_channels_enc=8, num_channels_dec=8, num_groups_per_scale=2,
                    num_latent_per_group=4, batch_size=16)
    budget = ablate.calibrate(config, minutes=10, device="cpu")
    assert budget["steps"] == int(600 / budget["step_seconds"])
    assert budget["steps_per_epoch"] == ablate.steps_per_epoch(config)
    fixed = ablate.with_steps(config, 10_000, budget["steps_per_epoch"])
    assert fixed.max_steps == 10_000 and fixed.epochs * budget["steps_per_epoch"] >= 10_000


def test_gpu_workers_pull_runs_from_the_queue(ablate, tmp_path, monkeypatch):
    """--gpus starts one --run-one subprocess per run, each with its GPU made the only one."""
    import hvae.training
    calls, seen = [], []
    monkeypatch.setattr(hvae.training, "train", fake_train(calls))

    def fake_run(cmd, env, stdout, stderr):
        seen.append(env["CUDA_VISIBLE_DEVICES"])
        assert Path(cmd[1]).name == "ablate_kl.py"
        ablate.main(cmd[2:])  # the worker's command line, run in-process
        return type("Done", (), {"returncode": 0})()

    monkeypatch.setattr(ablate.subprocess, "run", fake_run)
    monkeypatch.setattr(ablate.cli, "parse_device", lambda d: d)  # the workers' GPUs are pretend
    argv = ["--variants", "full,no_balance,beta_2", "--gpus", "0,1", "--max-steps", "5",
            "--out", str(tmp_path)] + TINY
    assert ablate.main(argv) == 0
    assert len(seen) == 3 and set(seen) <= {"0", "1"}
    assert sorted(c[0] for c in calls) == ["beta_2-s1", "full-s1", "no_balance-s1"]
    assert all(c[2] == "cuda:0" for c in calls)
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert [r["variant"] for r in rows] == ["full", "no_balance", "beta_2"]
