"""The run report: one self-contained HTML page (embedded images, inline SVG, no network)
and a JSON file of the same numbers."""
from __future__ import annotations

import base64
import io
import json
import math
import re
import shutil
import subprocess

import pytest
import torch
from PIL import Image

from hvae.config import preset
from hvae.model import NVAE
from hvae.report import build_report, write_report

from test_training import TINY, bernoulli_batch


@pytest.fixture(scope="module")
def report_files(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    torch.manual_seed(0)
    cfg = preset("demo", **TINY)
    model = NVAE(cfg).eval()
    loader = torch.utils.data.DataLoader(torch.cat([bernoulli_batch(16, seed=i) for i in range(2)]),
                                         batch_size=16)
    metrics_file = out / "metrics.jsonl"
    rows = [{"split": "train", "step": s, "nelbo": 500 - s, "bpd": 0.9 - s / 1000} for s in (1, 2, 3)]
    rows += [{"split": "test", "step": 3, "test_nelbo": 480.0}]
    metrics_file.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"split": "tra')
    report, images = build_report(model, cfg, loader, num_iw_samples=3, metrics_file=metrics_file,
                                  step=3, num_images=16)
    page, data = write_report(out, report, images)
    return page, data, model


def test_the_report_holds_the_numbers_and_the_images(report_files):
    page, data, model = report_files
    report = json.loads(data.read_text())
    iw = report["iw"]
    assert iw["num_samples"] == 3 and iw["num_images"] == 32
    assert iw["nll_bpd"] == pytest.approx(iw["nll_nats"] / (784 * math.log(2)))
    assert math.isfinite(iw["nll_stderr_nats"]) and iw["nll_stderr_nats"] > 0
    assert len(report["kl_per_group"]) == len(report["active_units_per_group"]) == model.num_groups
    assert report["curves"]["train_nelbo"] == [[1, 499], [2, 498], [3, 497]]  # the cut line skipped
    assert report["images"] == ["reconstructions", "samples_t0.6", "samples_t0.8", "samples_t1"]
    text = page.read_text()
    pngs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(pngs) == 4
    for png in pngs:
        assert Image.open(io.BytesIO(base64.b64decode(png))).size[0] > 28
    assert "http" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "")  # nothing fetched
    assert "<script" not in text and text.count("<svg") == 4
    assert f"{iw['nll_nats']:.2f} ± {iw['nll_stderr_nats']:.2f} nats" in text


@pytest.mark.skipif(shutil.which("chromium") is None, reason="no headless Chromium installed")
def test_a_headless_browser_opens_the_report_and_loads_its_images(report_files, tmp_path):
    """Chromium without network loads the page and decodes all four embedded images
    (a probe script, added to a copy, counts them into the title)."""
    page, _, _ = report_files
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace(
        "</body>", "<script>document.title = 'loaded ' + [...document.images].filter("
                   "i => i.complete && i.naturalWidth > 0).length;</script></body>"))
    done = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--virtual-time-budget=3000", "--dump-dom", probe.as_uri()],
        capture_output=True, text=True, timeout=120)
    assert "<title>loaded 4</title>" in done.stdout, done.stderr[-2000:]


def test_curves_keep_the_run_a_heal_kept(tmp_path):
    """A heal at step 4 rolled back to step 2: the curves drop steps 3 and 4 of the abandoned
    branch, keep its replay, and the page lists the heal."""
    from hvae.report import read_curves, render_html
    rows = [{"split": "train", "step": s, "nelbo": 500 - s, "bpd": 0.9} for s in (1, 2, 3, 4)]
    rows += [{"split": "heal", "step": 4, "heals": 1, "lr_scale": 0.5, "rolled_back_to": 2}]
    rows += [{"split": "train", "step": s, "nelbo": 400 - s, "bpd": 0.8} for s in (3, 4)]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    curves = read_curves(path)
    assert curves["train_nelbo"] == [[1, 499], [2, 498], [3, 397], [4, 396]]
    assert curves["heals"] == [[4, 2, 0.5]]
    report = {"test": {}, "iw": {}, "kl_per_group": [], "active_units_per_group": [],
              "images": [], "config": {}, "preset": "demo", "dataset": "d", "data_dims": 784,
              "hvae_version": "x", "torch_version": "y", "curves": curves}
    assert "at step 4: rolled back to step 2, learning rate x0.5" in render_html(report, {})
