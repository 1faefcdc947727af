"""A run's report: one self-contained HTML page and a JSON file of the same numbers.

The page needs no network and no JavaScript: images are embedded as PNG data URIs and
the charts are inline SVG.  It shows the test NELBO and the importance-weighted NLL in
nats and bits/dim with their standard errors and the K used, the KL and the active
units of every latent group, samples at several temperatures, reconstructions, the
training curves from ``metrics.jsonl``, and the config with the hvae and torch versions.

    report, images = build_report(model, config, test_loader, num_iw_samples=100)
    write_report("runs/demo", report, images)      # report.html, report.json
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import nn

import hvae
from hvae import evaluation as ev

TEMPERATURES = (0.6, 0.8, 1.0)


def build_report(model: nn.Module, config, test_loader: Iterable, *, num_iw_samples: int,
                 metrics: dict | None = None, metrics_file: str | os.PathLike | None = None,
                 max_batches: int = 0, seed: int = 0, step: int | None = None,
                 temperatures: Sequence[float] = TEMPERATURES, num_images: int = 36,
                 progress: bool = False) -> tuple[dict, dict[str, bytes]]:
    """The report's numbers and its PNG images.  ``metrics`` may hold what the caller
    has already computed (``test_metrics`` and ``iw_log_likelihood``'s ``iw_``-prefixed
    results, as the end of training has them); anything missing is computed here."""
    metrics = dict(metrics or {})
    if "test_nelbo" not in metrics:
        metrics.update(ev.test_metrics(model, test_loader, max_batches=max_batches, seed=seed))
    if "iw_nll_nats" not in metrics:
        iw = ev.iw_log_likelihood(model, test_loader, num_iw_samples, max_batches=max_batches,
                                  seed=seed, progress=progress)
        metrics.update({f"iw_{k}": v for k, v in iw.items()})
    images = {}
    nrow = max(int(math.sqrt(num_images)), 1)
    for t in temperatures:
        images[f"samples_t{t:g}"] = _png(ev.generate(model, num_images, t=t, seed=seed), nrow)
    dataset = getattr(test_loader, "dataset", None)
    if dataset is not None:
        x = ev.evenly_spaced(dataset, nrow * (nrow // 2) or 1).to(ev.model_device(model))
        with ev.seeded(seed, x.device):  # posterior draws that leave the caller's RNG alone
            recons = ev.reconstruct(model, x)["recons"]
        images["reconstructions"] = _png(ev.interleave_rows(x.float().cpu(), recons.cpu(),
                                                            nrow=nrow), nrow)
    report = {
        "hvae_version": hvae.__version__, "torch_version": torch.__version__,
        "preset": config.preset, "dataset": config.dataset, "step": step,
        "data_dims": int(model.data_dims),
        "test": {key: metrics[key] for key in (
            "test_nelbo", "test_bpd", "test_recon", "test_kl") if key in metrics},
        "iw": {key[3:]: value for key, value in metrics.items() if key.startswith("iw_")},
        "kl_per_group": metrics.get("test_kl_groups", []),
        "active_units_per_group": metrics.get("active_units", []),
        "temperatures": list(temperatures),
        "curves": read_curves(metrics_file) if metrics_file else {},
        "images": sorted(images),
        "config": config.to_dict(),
    }
    return report, images


def read_curves(metrics_file: str | os.PathLike) -> dict[str, list[list[float]]]:
    """(step, value) pairs of the training NELBO and bits/dim and of the test NELBO, and
    the heals as (step, rolled back to, learning-rate factor).  A heal's rollback drops the
    points after the step it went back to: the curves show the run that was kept."""
    path = Path(metrics_file)
    curves: dict[str, list[list[float]]] = {"train_nelbo": [], "train_bpd": [], "test_nelbo": [],
                                            "heals": []}
    if not path.is_file():
        return curves
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut short by a killed run
        split, step = row.get("split"), row.get("step")
        for key, name in (("nelbo", "train_nelbo"), ("bpd", "train_bpd")):
            if split == "train" and _finite(row.get(key)):
                curves[name].append([step, row[key]])
        if split == "test" and _finite(row.get("test_nelbo")):
            curves["test_nelbo"].append([step, row["test_nelbo"]])
        if split == "heal" and _finite(row.get("rolled_back_to")):
            back = row["rolled_back_to"]
            for name in ("train_nelbo", "train_bpd", "test_nelbo"):
                curves[name] = [point for point in curves[name] if point[0] <= back]
            curves["heals"].append([step, back, row.get("lr_scale")])
    return curves


def write_report(out_dir: str | os.PathLike, report: dict, images: dict[str, bytes],
                 name: str = "report") -> tuple[Path, Path]:
    """Write ``NAME.html`` and ``NAME.json`` to ``out_dir`` (replacing earlier ones, via a
    temporary file each, so a killed write leaves the old report whole)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    page, data = out / f"{name}.html", out / f"{name}.json"
    for path, text in ((page, render_html(report, images)),
                       (data, json.dumps(report, indent=1, default=float) + "\n")):
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    return page, data


# ------------------------------------------------------------------ the page --
def render_html(report: dict, images: dict[str, bytes]) -> str:
    test, iw = report["test"], report["iw"]
    rows = []
    if "nll_nats" in iw:
        k = iw.get("num_samples")
        rows.append(("importance-weighted NLL", _nats_bpd(iw["nll_nats"], iw.get("nll_stderr_nats"),
                                                          report["data_dims"]),
                     f"K = {k} importance samples, {iw.get('num_images')} test images"))
    if "nelbo_nats" in iw:
        rows.append(("NELBO (single sample)", _nats_bpd(iw["nelbo_nats"], iw.get("nelbo_stderr_nats"),
                                                        report["data_dims"]),
                     "mean over the same K draws"))
    if "test_nelbo" in test:
        rows.append(("test NELBO (validation pass)", _nats_bpd(test["test_nelbo"], None,
                                                               report["data_dims"]),
                     f"reconstruction {test.get('test_recon', float('nan')):.2f} + "
                     f"KL {test.get('test_kl', float('nan')):.2f} nats"))
    summary = "".join(f"<tr><th>{_e(a)}</th><td>{b}</td><td>{_e(c)}</td></tr>" for a, b, c in rows)
    kl, units = report["kl_per_group"], report["active_units_per_group"]
    groups = [f"{i}" for i in range(len(kl))]
    curves = report.get("curves") or {}
    images_html = "".join(
        f'<figure><img alt="{_e(name)}" src="data:image/png;base64,'
        f'{base64.b64encode(images[name]).decode()}"><figcaption>{_e(_caption(name))}'
        f"</figcaption></figure>" for name in report["images"] if name in images)
    config = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>"
                     for k, v in sorted(report["config"].items()))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>hvae report: {_e(report['preset'])}</title>
<style>
body {{ font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
h1 {{ font-size: 1.5em; }} h2 {{ font-size: 1.15em; margin-top: 2em; }}
table {{ border-collapse: collapse; }} th, td {{ padding: 3px 10px; text-align: left;
  border-bottom: 1px solid #ddd; vertical-align: top; }}
figure {{ display: inline-block; margin: 0 12px 12px 0; }} img {{ image-rendering: pixelated;
  width: 320px; border: 1px solid #ccc; }}
.charts svg {{ margin-right: 16px; }} .small td, .small th {{ font-size: 12px; padding: 1px 8px; }}
</style></head><body>
<h1>hvae report: {_e(report['preset'])} on {_e(report['dataset'])}
{'' if report.get('step') is None else f'after {report["step"]:,} steps'}</h1>
<p>Negative log-likelihoods in nats per image and bits per dimension
({report['data_dims']:,} dimensions); ± is one standard error over the test images.</p>
<table>{summary}</table>
<h2>Latent groups (top first)</h2>
<div class="charts">{bar_chart(kl, groups, "KL per group (nats)")}
{bar_chart(units, groups, "active units per group")}</div>
<h2>Samples and reconstructions</h2>
{images_html}
<h2>Training curves</h2>
<div class="charts">{line_chart({"train": curves.get("train_nelbo", []),
                                  "test": curves.get("test_nelbo", [])}, "NELBO (nats)")}
{line_chart({"train": curves.get("train_bpd", [])}, "bits/dim")}</div>
{_heals_html(curves.get("heals", []))}
<h2>Config</h2>
<table class="small">{config}</table>
<p>hvae {_e(report['hvae_version'])}, torch {_e(report['torch_version'])}</p>
</body></html>
"""


def bar_chart(values: Sequence[float], labels: Sequence[str], title: str,
              width: int = 420, height: int = 220) -> str:
    """An inline SVG bar chart (no script, no network)."""
    if not values:
        return f"<p>{_e(title)}: none</p>"
    top = max(max(values), 1e-12)
    left, bottom, plot_h = 40, 30, height - 60
    slot = (width - left - 10) / len(values)
    bars = []
    for i, (value, label) in enumerate(zip(values, labels)):
        h = plot_h * max(value, 0) / top
        x = left + i * slot
        bars.append(f'<rect x="{x + slot * 0.1:.1f}" y="{height - bottom - h:.1f}" '
                    f'width="{slot * 0.8:.1f}" height="{h:.1f}" fill="#4a7bd0">'
                    f"<title>{_e(label)}: {value:.3g}</title></rect>"
                    f'<text x="{x + slot / 2:.1f}" y="{height - bottom + 14}" font-size="10" '
                    f'text-anchor="middle">{_e(label)}</text>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'role="img"><text x="{left}" y="16" font-size="13">{_e(title)}</text>'
            f'<text x="{left - 4}" y="{height - bottom - plot_h + 4:.0f}" font-size="10" '
            f'text-anchor="end">{top:.3g}</text><line x1="{left}" y1="{height - bottom}" '
            f'x2="{width - 10}" y2="{height - bottom}" stroke="#888"/>{"".join(bars)}</svg>')


def line_chart(series: dict[str, list[list[float]]], title: str, width: int = 460,
               height: int = 240) -> str:
    """An inline SVG line chart of (x, y) series (no script, no network)."""
    points = [p for s in series.values() for p in s]
    if not points:
        return f"<p>{_e(title)}: no logged values</p>"
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(max(xs), min(xs) + 1)
    y0, y1 = min(ys), max(max(ys), min(ys) + 1e-9)
    left, bottom, right, top_pad = 56, 30, 10, 26
    sx = lambda x: left + (x - x0) / (x1 - x0) * (width - left - right)  # noqa: E731
    sy = lambda y: height - bottom - (y - y0) / (y1 - y0) * (height - bottom - top_pad)  # noqa: E731
    colours = ("#4a7bd0", "#d0604a", "#3a9a5a")
    lines = []
    for k, (name, pts) in enumerate(series.items()):
        if not pts:
            continue
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        c = colours[k % len(colours)]
        lines.append(f'<polyline points="{path}" fill="none" stroke="{c}" stroke-width="1.5"/>'
                     f'<text x="{width - right - 60}" y="{top_pad + 14 * k}" font-size="11" '
                     f'fill="{c}">{_e(name)}</text>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'role="img"><text x="{left}" y="16" font-size="13">{_e(title)}</text>'
            f'<text x="{left - 4}" y="{sy(y1) + 4:.0f}" font-size="10" text-anchor="end">{y1:.4g}</text>'
            f'<text x="{left - 4}" y="{sy(y0):.0f}" font-size="10" text-anchor="end">{y0:.4g}</text>'
            f'<text x="{left}" y="{height - 8}" font-size="10">step {x0:,.0f}</text>'
            f'<text x="{width - right}" y="{height - 8}" font-size="10" text-anchor="end">'
            f'{x1:,.0f}</text><line x1="{left}" y1="{height - bottom}" x2="{width - right}" '
            f'y2="{height - bottom}" stroke="#888"/>{"".join(lines)}</svg>')


# ------------------------------------------------------------------- helpers --
def _heals_html(heals: list) -> str:
    """One line per heal of the run (self-healing training), or nothing."""
    if not heals:
        return ""
    items = "".join(f"<li>at step {step:,}: rolled back to step {back:,}, learning rate "
                    f"x{scale:g} from there</li>" for step, back, scale in heals)
    return f"<p>The run healed itself {len(heals)} time(s):</p><ul>{items}</ul>"


def _png(images: torch.Tensor, nrow: int) -> bytes:
    from torchvision.utils import make_grid
    grid = make_grid(images.float().clamp(0, 1).cpu(), nrow=nrow, padding=2, pad_value=1.0)
    from PIL import Image
    array = grid.mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array if array.shape[2] == 3 else array[:, :, 0]).save(buffer, format="PNG")
    return buffer.getvalue()


def _nats_bpd(nats: float, stderr: float | None, dims: int) -> str:
    bpd = nats / (dims * math.log(2))
    if stderr is None or not _finite(stderr):
        return f"{nats:.2f} nats = {bpd:.4f} bits/dim"
    return (f"{nats:.2f} ± {stderr:.2f} nats = {bpd:.4f} ± "
            f"{stderr / (dims * math.log(2)):.4f} bits/dim")


def _caption(name: str) -> str:
    return f"samples at temperature {name[len('samples_t'):]}" if name.startswith("samples_t") \
        else "reconstructions: rows of test inputs, each above its reconstruction"


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _e(value: Any) -> str:
    return html.escape(str(value))
