"""The HTML report: self-contained, escaped, small, and it renders in headless Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from causalpatch.report import report
from causalpatch.result import PatchingResult

HOSTILE = ['<script>alert(1)</script>', '"><img src=x onerror=alert(1)>']
ROOT = Path(__file__).resolve().parents[1]


def grid(shape, axes, component, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = {"layer": list(range(shape[0]))}
    if "position" in axes:
        labels["position"] = [f"{i}: {HOSTILE[i % 2]!r}" for i in range(shape[1])]
    if "head" in axes:
        labels["head"] = list(range(shape[-1]))
    return PatchingResult(
        effect_matrix=torch.randn(*shape, generator=g), axes=axes, labels=labels,
        component=component, metric="logit_diff", model_name=HOSTILE[1],
        clean_prompts=[HOSTILE[0]], corrupted_prompts=[HOSTILE[1]],
        clean_tokens=[HOSTILE], clean_metric=1.0, corrupted_metric=-1.0,
        extra={"positions": list(range(shape[1])) if "position" in axes else None})


@pytest.fixture(scope="module")
def four_results():
    return [grid((30, 9), ("layer", "head"), "attn_head"),
            grid((30, 14), ("layer", "position"), "resid_post", 1),
            grid((30, 14), ("layer", "position"), "attn", 2),
            grid((30, 14), ("layer", "position"), "mlp", 3)]


def test_user_text_is_escaped(four_results, tmp_path):
    page = report(four_results, tmp_path / "r.html", title=HOSTILE[0])
    scripts = re.findall(r"<script>(.*?)</script>", page, flags=re.DOTALL)
    outside = re.sub(r"<script>.*?</script>", "", page, flags=re.DOTALL)
    assert "<script>alert" not in outside and "<img src=x" not in outside
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in outside
    assert all("</script" not in s for s in scripts)  # embedded JSON cannot close the tag
    from plotly.offline import get_plotlyjs

    assert page.count(get_plotlyjs()) == 1  # plotly.js inlined exactly once
    assert len(scripts) == 2  # plotly.js, then the plot calls


def test_report_is_self_contained_and_small(four_results, tmp_path):
    path = tmp_path / "r.html"
    page = report(four_results, path)
    assert "src=\"http" not in page and "src='http" not in page
    assert path.stat().st_size < 5 * 2**20


def test_chromium_renders_every_plot_without_console_errors(four_results, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Debian's chromium is required (make test installs it: apt-get install chromium)"
    path = tmp_path / "report.html"
    report(four_results, path, title="IOI report (synthetic data)")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000"]
    dom = subprocess.run([chromium, *flags, "--enable-logging=stderr", "--v=0", "--dump-dom",
                          path.as_uri()], capture_output=True, text=True, timeout=120)
    n_plots = len(re.findall(r'id="plot-\d+-\d+"', dom.stdout))
    rendered = len(re.findall(r'class="plot[^"]*js-plotly-plot', dom.stdout))
    assert n_plots == 4 and rendered == 4, (n_plots, rendered, dom.stderr[-2000:])
    assert dom.stdout.count("main-svg") >= 8
    errors = [line for line in dom.stderr.splitlines()
              if "CONSOLE" in line and ("Uncaught" in line or "Error" in line)]
    assert errors == []
    shot = ROOT / "docs" / "img" / "report.png"
    subprocess.run([chromium, *flags, "--window-size=1400,1800", f"--screenshot={shot}",
                    path.as_uri()], capture_output=True, timeout=120, check=True)
    assert shot.stat().st_size > 10_000
