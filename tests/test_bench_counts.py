"""scripts/bench.py: the device-independent counts it reports for a training step."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench", ROOT / "scripts" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_covered_length_merges_overlapping_kernels(bench):
    assert bench.covered_length([]) == 0
    assert bench.covered_length([(0, 10), (5, 15), (20, 30)]) == 25   # overlap counted once
    assert bench.covered_length([(20, 30), (0, 40)]) == 40            # nested, unsorted
    assert bench.covered_length([(0, 5), (5, 9)]) == 9                # touching


def test_bench_reports_one_host_sync_per_step(bench, capsys, tmp_path):
    """The training step reads the device once (the skip decision); the op count is
    what a GPU would launch, so it must be reported and plausible."""
    assert bench.main(["--preset", "demo", "--batch_size", "2", "--num_channels_enc", "8",
                       "--num_channels_dec", "8", "--steps", "1", "--warmup", "0",
                       "--num-samples", "2", "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["host_syncs_per_step"] == 1, report["host_sync_sites"]
    assert 500 < report["aten_ops_per_step"] < 5000
    assert "gpu_busy_fraction" not in report   # CUDA only


def test_bench_reports_what_the_first_step_compiled_and_that_later_steps_add_nothing(
        bench, capsys):
    """``--compile``: the graphs the first step compiled, and the recompiles of the later
    ones (the KL weight changes every step, and enters no compiled region)."""
    assert bench.main(["--preset", "demo", "--batch_size", "2", "--num_channels_enc", "8",
                       "--num_channels_dec", "8", "--steps", "4", "--warmup", "0",
                       "--num-samples", "2", "--device", "cpu", "--compile", "regional",
                       "--backend", "aot_eager"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["compiled_graphs"] > 0 and report["recompiles_after_first_step"] == 0


def run_table(tmp_path, *extra):
    import subprocess
    import sys
    out = tmp_path / "rows.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench_table.py"), "--presets", "demo",
         "--batch", "2", "--amp", "none,bf16", "--compile", "none", "--json", str(out),
         "--extra", "--steps 1 --warmup 0 --num-samples 2 --num_channels_enc 8 "
                    "--num_channels_dec 8 --threads 1 " + " ".join(extra)],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines(), json.loads(out.read_text())


def test_bench_table_prints_a_row_per_configuration(tmp_path):
    lines, reports = run_table(tmp_path)
    assert lines[0].startswith("| preset | batch | amp | compile | CUDA graphs | ms/step")
    assert [line.split(" | ")[2] for line in lines[2:]] == ["none", "bf16"]
    assert [r["amp"] for r in reports] == ["none", "bf16"]
    assert all(r["host_syncs_per_step"] == 1 for r in reports)


def test_bench_table_survives_a_failing_row(tmp_path):
    lines, reports = run_table(tmp_path, "--num_latent_scales 7")  # does not fit 32 pixels
    assert len(lines) == 4 and all("error:" in line for line in lines[2:])
    assert all("error" in r for r in reports)
