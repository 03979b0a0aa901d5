"""The HTML report: self-contained, escaped, small, and it renders in headless Chromium.

The Chromium tests need Debian's ``chromium`` package (``apt-get install chromium``); without
it they FAIL, on purpose: CI installs it.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from conftest import assert_within

from causalpatch.errors import InvalidArgumentError, InvalidTypeError
from causalpatch.render.html import report, script_json
from causalpatch.render.markdown import to_markdown
from causalpatch.result import PatchingResult, write_report

HOSTILE = ["<script>alert(1)</script>", '"><img src=x onerror=alert(1)>']
IOI_NAMES = [("Mary", "John"), ("Anne", "Tom"), ("Lisa", "Mark")]
IOI_CLEAN = [f"When {a} and {b} went to the store, {b} gave a drink to" for a, b in IOI_NAMES]
IOI_CORRUPTED = [f"When {a} and {b} went to the store, {a} gave a drink to" for a, b in IOI_NAMES]
IOI_TOKENS = ["When", " Mary", " and", " John", " went", " to", " the", " store", ",", " John",
              " gave", " a", " drink", " to"]
FIVE_MB = 5_000_000  # decimal megabytes: the stricter reading of "5 MB"
IOI_ROLES = ["", "IO", "", "S1", "S1+1", "", "", "", "", "S2", "", "", "", "END"]
IOI_ANSWERS = [[f" {a}", f" {b}"] for a, b in IOI_NAMES]


def ioi_like(shape, axes, component, seed=0, **overrides) -> PatchingResult:
    """A synthetic result that looks like an IOI sweep: small noise plus a few strong cells."""
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(*shape, generator=g) * 0.04
    flat = m.view(-1)
    strong = torch.randperm(flat.numel(), generator=g)[:6]
    flat[strong] = torch.tensor([0.62, -0.41, 0.35, 0.27, -0.22, 0.18])
    labels = {"layer": list(range(shape[0]))}
    if "position" in axes:
        n = shape[axes.index("position")]
        labels["position"] = [f"{i}: {IOI_TOKENS[i]!r}" for i in range(n)]
    for axis in axes:
        if axis not in labels:
            labels[axis] = list(range(shape[axes.index(axis)]))
    fields = dict(
        effect_matrix=m, axes=axes, labels=labels, component=component, metric="logit_diff",
        model_name="smollm2-135m (synthetic data)", clean_prompts=IOI_CLEAN,
        corrupted_prompts=IOI_CORRUPTED, clean_tokens=[IOI_TOKENS], clean_metric=3.21,
        corrupted_metric=-0.84, std=m.abs() / 4, timings={"setup_s": 0.41, "run_s": 2.73},
        extra={"n_pairs": 3, "positions": list(range(len(labels.get("position", []))))})
    fields.update(overrides)
    return PatchingResult(**fields)


def with_pairs(result: PatchingResult, seed: int = 0, roles=True) -> PatchingResult:
    """``result`` with per-pair values (whose mean is the effect), answers as text and roles."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(3, *result.shape, generator=g) * 0.1
    result.per_pair = result.effect_matrix + noise - noise.mean(0)
    result.effect_matrix = result.per_pair.mean(0)
    result.std = result.per_pair.std(0, unbiased=False)
    result.extra["answer_text"] = IOI_ANSWERS
    if roles:
        result.extra["position_roles"] = [IOI_ROLES] * 3
    return result


def hostile_result() -> PatchingResult:
    """Every user-controlled string is an injection attempt."""
    labels = {"layer": [0, 1, 2], "position": [f"{i}: {HOSTILE[i % 2]!r}" for i in range(4)]}
    return PatchingResult(
        effect_matrix=torch.randn(3, 4, generator=torch.Generator().manual_seed(7)),
        axes=("layer", "position"), labels=labels, component="resid_post</script>",
        metric="logit_diff", model_name=HOSTILE[1], clean_prompts=[HOSTILE[0]],
        corrupted_prompts=[HOSTILE[1]], clean_tokens=[HOSTILE],
        clean_metric=1.0, corrupted_metric=-1.0,
        extra={"note": HOSTILE[0] + "</script><!--", "positions": [0, 1, 2, 3]})


@pytest.fixture(scope="module")
def four_results():
    """The size budget's case: one 30x9 heads heatmap and three 30x14 position heatmaps."""
    return [ioi_like((30, 9), ("layer", "head"), "attn_head"),
            ioi_like((30, 14), ("layer", "position"), "resid_post", 1),
            ioi_like((30, 14), ("layer", "position"), "attn_out", 2),
            ioi_like((30, 14), ("layer", "position"), "mlp_out", 3)]


def scripts_of(page: str) -> list[tuple[str, str]]:
    """(attributes, body) of every <script> element."""
    return re.findall(r"<script([^>]*)>(.*?)</script>", page, flags=re.DOTALL)


def figures_of(page: str) -> list[dict]:
    (body,) = [b for attrs, b in scripts_of(page) if "application/json" in attrs]
    return json.loads(body)


# -- structure, escaping and size ---------------------------------------------------------------
def test_user_text_is_escaped(tmp_path):
    page = report([hostile_result()], tmp_path / "r.html", title=HOSTILE[0])
    outside = re.sub(r"<script[^>]*>.*?</script>", "", page, flags=re.DOTALL)
    assert "<script>alert" not in outside and "<img src=x" not in outside
    assert "<img" not in outside
    assert html.escape(HOSTILE[0]) in outside and html.escape(HOSTILE[1]) in outside
    assert f"<title>{html.escape(HOSTILE[0])}</title>" in page
    scripts = scripts_of(page)
    assert len(scripts) == 3  # plotly.js, the figures (JSON), the 10-line init script
    data, init = scripts[1][1], scripts[2][1]
    assert "application/json" in scripts[1][0]
    assert "</" not in data and "<!--" not in data and "alert(1)" in data and "</" not in init
    # text plotly draws is escaped as well (plotly reads some HTML tags in labels)
    (figure,) = figures_of(page)
    ticks = figure["data"][0]["x"]
    assert all("<" not in t for t in ticks) and "&lt;script&gt;" in ticks[0]


def test_script_json_cannot_close_the_script_element():
    text = script_json({"a": "</script><!-- \u2028 \u2029 </SCRIPT>"})
    assert "</" not in text and "<!--" not in text and "\u2028" not in text
    assert json.loads(text) == {"a": "</script><!-- \u2028 \u2029 </SCRIPT>"}


def test_report_of_four_results_has_plotly_once_and_is_small(four_results, tmp_path):
    from plotly.offline import get_plotlyjs

    path = tmp_path / "r.html"
    page = report(four_results, path)
    size = path.stat().st_size
    print(f"report size: {size} bytes ({size / 2**20:.2f} MiB); plotly.js "
          f"{len(get_plotlyjs().encode())} bytes")
    assert size == len(page.encode()) and size < FIVE_MB
    assert page.count(get_plotlyjs()) == 1 and page.count("<script") == 3
    assert len(figures_of(page)) == 4 and len(re.findall(r"<section id='result-\d+'", page)) == 4
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"]  # atomic: no temp file left


def test_report_is_self_contained(four_results):
    page = report(four_results)
    outside = re.sub(r"<script[^>]*>.*?</script>", "", page, flags=re.DOTALL)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", outside)
    assert "<link" not in outside and "@import" not in outside
    # the Content-Security-Policy allows exactly the page's own two scripts and no network
    csp = re.search(r'http-equiv=.Content-Security-Policy. content="([^"]*)"', page).group(1)
    assert "default-src 'none'" in csp and "http" not in csp
    for attrs, body in scripts_of(page):
        if "application/json" not in attrs:
            digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
            assert f"'sha256-{digest}'" in csp


def test_report_shows_metadata_versions_and_top_components(four_results):
    page = report(four_results[1], title="IOI")
    for text in ("logit_diff", "denoise", "smollm2-135m (synthetic data)", "3.2100", "-0.8400",
                 html.escape(IOI_CLEAN[2]), "setup 0.41 s", "causalpatch ", "torch ",
                 "transformers ", "Top components", "<th>position</th>", "std"):
        assert text in page, text
    (index, effect), = four_results[1].top_components(1)
    assert f"{effect:+.4f}" in page
    assert html.escape(four_results[1].describe_index(index).split("position ")[1]) in page


def test_hover_text_names_layer_position_token_head_and_effect():
    result = ioi_like((5, 4, 3), ("layer", "position", "head"), "attn_head")
    (figure,) = figures_of(report(result))
    trace = figure["data"][0]
    assert trace["type"] == "heatmap" and trace["x"][1] == "1: ' Mary'"
    assert "layer %{y}" in trace["hovertemplate"] and "position %{x}" in trace["hovertemplate"]
    assert "head %{customdata}" in trace["hovertemplate"] and "%{z" in trace["hovertemplate"]
    steps = figure["layout"]["sliders"][0]["steps"]
    assert len(steps) == 1 + 3  # the largest effect over heads, then one step per head
    assert "head 2" in steps[3]["args"][0]["hovertemplate"][0]
    assert figure["data"][0]["zmin"] == -figure["data"][0]["zmax"]


def test_one_dimensional_results_are_bar_charts_and_nan_is_null():
    result = ioi_like((6,), ("layer",), "mlp_out")
    result.effect_matrix[2] = float("nan")
    (figure,) = figures_of(result.to_html())
    trace = figure["data"][0]
    assert trace["type"] == "bar" and trace["y"][2] is None and len(trace["x"]) == 6
    assert "layer %{x}" in trace["hovertemplate"]


def test_to_html_writes_a_report(tmp_path):
    result = ioi_like((4, 3), ("layer", "head"), "attn_head")
    page = result.to_html(tmp_path / "one.html", title="heads")
    assert (tmp_path / "one.html").read_text() == page and "<title>heads</title>" in page


def test_report_argument_errors():
    with pytest.raises(InvalidArgumentError, match="at least one"):
        report([])
    with pytest.raises(InvalidTypeError, match="PatchingResult"):
        report(["not a result"])


def test_report_is_duck_typed_on_results():
    """render/ never imports causalpatch.result: an object shaped like a result is reported."""

    class Wrapped:
        def __init__(self, result):
            self._result = result

        def __getattr__(self, name):
            return getattr(self._result, name)

    result = ioi_like((4, 3), ("layer", "head"), "attn_head")
    assert report(Wrapped(result)) == report(result) == report([Wrapped(result)])
    assert to_markdown(Wrapped(result)) == result.to_markdown()  # the Markdown renderer too


def test_render_does_not_import_result_or_private_names():
    """Rank 13 (render/) sits below result (14): runtime imports of it are a cycle. Names
    used across modules are public."""
    import ast

    import causalpatch.render

    for path in sorted(Path(causalpatch.render.__file__).parent.glob("*.py")):
        tree = ast.parse(path.read_text())
        checking = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                    and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
        for node in ast.walk(tree):
            if id(node) in checking or not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            if isinstance(node, ast.ImportFrom):
                module = ("." * node.level) + (node.module or "")
                internal = node.level > 0 or module.startswith("causalpatch")
                assert not (internal and module.endswith("result")), (path.name, module)
                if internal:
                    private = [a.name for a in node.names if a.name.startswith("_")]
                    assert not private, (path.name, module, private)
            else:
                assert not any(a.name.startswith("causalpatch.result") for a in node.names)


# -- headless Chromium ---------------------------------------------------------------------------
def chromium_binary() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, ("headless Chromium is required for the report rendering test: install "
                   "Debian's package with `apt-get update && apt-get install -y chromium` "
                   "(`make test` does)")
    return found


def chromium(path: Path, tmp: Path, *extra: str, fragment: str = "") -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp / 'chromium-profile'}", "--virtual-time-budget=5000",
             "--enable-logging=stderr", "--v=0", *extra]
    url = path.as_uri() + (f"#{fragment}" if fragment else "")
    return subprocess.run([chromium_binary(), *flags, url], capture_output=True, text=True,
                          timeout=180)


class _PlotScan(HTMLParser):
    """For each element with id ``plot-N`` / ``pairplot-N``: does it hold svg.main-svg and
    drawn marks? (``attrs`` keeps each plot element's attributes.)"""

    def __init__(self) -> None:
        super().__init__()
        self.plots: dict[str, dict[str, int]] = {}
        self.attrs: dict[str, dict[str, str]] = {}
        self.stack: list[str | None] = []
        self.images = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images += 1
        if tag in ("br", "img", "meta", "input", "hr", "link"):
            return
        current = next((p for p in reversed(self.stack) if p), None)
        if re.fullmatch(r"(pair)?plot-\d+", a.get("id") or ""):
            current = a["id"]
            self.attrs[current] = {k: v or "" for k, v in a.items()}
            self.plots[current] = {"main-svg": 0, "image": 0, "bar": 0}
            self.stack.append(current)
            return
        self.stack.append(current)
        if current is None:
            return
        classes = (a.get("class") or "").split()
        counts = self.plots[current]
        counts["main-svg"] += tag == "svg" and "main-svg" in classes
        counts["image"] += tag == "image"  # plotly draws a heatmap as one <image>
        counts["bar"] += tag == "g" and "point" in classes  # one per bar

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in ("br", "img", "meta", "input", "hr", "link"):
            self.handle_endtag(tag)

    def handle_endtag(self, tag):
        if tag not in ("br", "img", "meta", "input", "hr", "link") and self.stack:
            self.stack.pop()


def page_problems(proc: subprocess.CompletedProcess, expected_plots: list[str]) -> list[str]:
    """Everything wrong with a rendered page: missing plots, console output, crashes."""
    problems = []
    if proc.returncode != 0:
        problems.append(f"chromium exited with {proc.returncode}")
    scan = _PlotScan()
    scan.feed(proc.stdout)
    for plot_id in expected_plots:
        counts = scan.plots.get(plot_id)
        if counts is None:
            problems.append(f"{plot_id}: no such element")
        elif counts["main-svg"] < 1 or counts["image"] + counts["bar"] < 1:
            problems.append(f"{plot_id}: not rendered ({counts})")
    # Chromium logs every console message (any level) and uncaught error as INFO:CONSOLE;
    # the report logs nothing, so any such line is a problem.
    for line in proc.stderr.splitlines():
        if re.search(r":CONSOLE[:(]", line) or "Uncaught" in line:
            problems.append(line.strip()[:300])
    if scan.images:
        problems.append(f"{scan.images} <img> elements (injected markup?)")
    return problems


def test_chromium_renders_every_plot_without_console_errors(four_results, tmp_path):
    """Every kind of plot (heatmaps, a bar chart, a 3-D slider, hostile labels) renders in
    headless Chromium with nothing on the console, and a screenshot of them is a real PNG (the
    docs' screenshot is made by scripts/report_screenshot.py, from real results)."""
    rich = with_pairs(ioi_like((12, 14), ("layer", "position"), "resid_post", 6))
    realistic = [rich, *four_results, ioi_like((30,), ("layer",), "mlp_out", 4),
                 ioi_like((30, 14, 9), ("layer", "position", "head"), "attn_head", 5)]
    results = [*realistic, hostile_result()]
    path = tmp_path / "report.html"
    report(results, path, title="IOI on SmolLM2-135M (synthetic data)")
    dom = chromium(path, tmp_path, "--dump-dom")
    expected = [f"plot-{i}" for i in range(len(results))]
    assert page_problems(dom, expected) == [], dom.stderr[-3000:]
    assert dom.stdout.count("js-plotly-plot") >= len(results)
    # the hostile labels were drawn as literal text (entities decoded once by plotly)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom.stdout
    drawn = re.sub(r'data-unformatted="[^"]*"', "", dom.stdout.split('id="plot-7"')[1])
    assert "&amp;lt;" not in drawn and "&lt;script&gt;alert(1)" in drawn

    shown = tmp_path / "shown.html"  # the picture for the docs leaves out the hostile result
    report(realistic, shown, title="IOI on SmolLM2-135M (synthetic data)")
    shot = tmp_path / "report.png"
    proc = chromium(shown, tmp_path, "--window-size=1400,2000", f"--screenshot={shot}")
    assert proc.returncode == 0 and shot.stat().st_size > 50_000, proc.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_chromium_draws_results_with_intervals(tmp_path):
    """Results whose cells carry 95% intervals (hover customdata ``[std, lower, upper]``, bars
    with interval error bars, a 3-D slider) render with nothing on the console."""
    gen = torch.Generator().manual_seed(0)
    results = []
    for shape, axes, component in (((6, 5), ("layer", "position"), "resid_post"),
                                   ((6,), ("layer",), "mlp_out"),
                                   ((4, 5, 3), ("layer", "position", "head"), "attn_head")):
        per_pair = torch.randn(5, *shape, generator=gen)
        std = per_pair.std(0) if len(shape) == 2 else None
        results.append(ioi_like(shape, axes, component, effect_matrix=per_pair.mean(0),
                                per_pair=per_pair, std=std, normalized=False))
    assert all(r.interval95() is not None for r in results)
    path = tmp_path / "intervals.html"
    page = report(results, path)
    assert page.count("95% bootstrap interval over the pairs") == len(results)
    dom = chromium(path, tmp_path, "--dump-dom")
    assert page_problems(dom, [f"plot-{i}" for i in range(len(results))]) == [], \
        dom.stderr[-3000:]


def test_the_chromium_check_catches_broken_pages(tmp_path):
    """The checker itself: console errors, exceptions and unrendered plots are all reported."""
    page = tmp_path / "broken.html"
    page.write_text("<!DOCTYPE html><html><body><div id='plot-0'></div>"
                    "<script>console.error('boom')</script>"
                    "<script>undefinedFunction()</script></body></html>")
    problems = page_problems(chromium(page, tmp_path, "--dump-dom"), ["plot-0", "plot-1"])
    text = "\n".join(problems)
    assert "plot-0: not rendered" in text and "plot-1: no such element" in text
    assert "boom" in text and "Uncaught ReferenceError" in text


# -- answers, roles, takeaways, prompt sets, per-pair views, scales, plotly modes ---------------
def test_report_shows_answers_roles_takeaway_and_one_prompt_table():
    heads = with_pairs(ioi_like((6, 4), ("layer", "head"), "attn_head"))
    resid = with_pairs(ioi_like((6, 14), ("layer", "position"), "resid_post", 1))
    page = report([heads, resid])
    outside = re.sub(r"<script[^>]*>.*?</script>", "", page, flags=re.DOTALL)
    assert outside.count("<table class='prompts'>") == 1  # one prompt table for both sections
    assert outside.count(f"<code>{html.escape(IOI_CLEAN[1])}</code>") == 1  # not per section
    assert html.escape("' Mary' (correct) vs ' John' (incorrect)") in outside
    assert html.escape("' Anne' (correct) vs ' Tom' (incorrect)") in outside
    assert outside.count("class='takeaway'") == 2
    assert html.escape(heads.takeaway()) in outside and "% of the clean-corrupted" in outside
    # roles: the axis, the top table and the token chips
    (_, resid_fig) = figures_of(page)
    assert resid_fig["data"][0]["x"][9] == "9: S2" and resid_fig["data"][0]["x"][2] == "2: ' and'"
    assert resid_fig["layout"]["xaxis"]["title"]["text"] == "position (role)"
    assert "<b class='role'>END</b>" in outside and "roles shared by all 3 pairs" in outside
    # the per-pair view: a selector, pair 0's details, and every pair's data with its own tokens
    assert "<select id='pair-select-1'" in outside and "id='pairplot-1'" in outside
    assert outside.count("<option value=") == 6
    pairs = resid_fig["pairs"]
    assert len(pairs["views"]) == len(pairs["details"]) == 3
    assert pairs["details"][2]["clean"] == IOI_CLEAN[2]
    assert pairs["details"][2]["answers"] == "' Lisa' (correct) vs ' Mark' (incorrect)"
    z2 = pairs["views"][2]["z"][0]
    # the page writes 5 significant digits: observed relative difference 1.3e-5 (-0.030622 for
    # -0.0306224); 5-digit rounding can reach 5e-5, and 1e-4 is 7.6x the observed
    assert_within(z2[0][0] / resid.per_pair[2, 0, 0].item(), 1.0, 1e-4, "pair 2's cell, rounded")
    assert pairs["views"][0]["x"][0][1] == "1: IO ' Mary'"  # pair 0's own token known
    assert pairs["views"][2]["x"][0][1] == "1: IO"          # other pairs: the role


def test_sections_from_other_prompts_say_so():
    first = ioi_like((4, 3), ("layer", "head"), "attn_head")
    other = ioi_like((4, 3), ("layer", "head"), "attn_head", 1,
                     clean_prompts=IOI_CLEAN[:1], corrupted_prompts=IOI_CORRUPTED[:1])
    page = report([first, other, first])
    assert page.count("<table class='prompts'>") == 2
    assert "id='prompts-A'" in page and "id='prompts-B'" in page
    assert "sections 1, 3" in page and "sections 2)" in page
    assert page.count("Built from other prompts") == 1
    (section2,) = re.findall(r"<section id='result-1'>.*?</section>", page, flags=re.DOTALL)
    assert "Built from other prompts" in section2 and "set B" in section2


def test_positions_of_pair_0_are_named_when_pairs_disagree():
    result = with_pairs(ioi_like((4, 14), ("layer", "position"), "resid_post"))
    baba = list(IOI_ROLES)
    baba[1], baba[3] = "S1", "IO"
    result.extra["position_roles"] = [IOI_ROLES, baba, IOI_ROLES]
    (figure,) = figures_of(page := report(result))
    assert figure["layout"]["xaxis"]["title"]["text"] == "position (tokens of pair 0)"
    assert figure["data"][0]["x"][1] == "1: ' Mary'"
    assert "tokens of pair 0 (the pairs give some positions different roles)" in page
    assert figure["pairs"]["views"][1]["x"][0][1] == "1: S1"  # each pair shows its own role


def test_shared_colour_scale():
    small = ioi_like((4, 3), ("layer", "head"), "attn_head")
    small.effect_matrix *= 0.1
    big = ioi_like((4, 5), ("layer", "position"), "resid_post", 1)
    raw = ioi_like((4, 3), ("layer", "head"), "attn_head", 2, normalized=False)
    raw.effect_matrix *= 10
    own = figures_of(report([small, big, raw]))
    shared = figures_of(report([small, big, raw], shared_scale=True))
    vmax = big.effect_matrix.abs().max().item()
    # the largest effects are the decimals 0.062 and 0.62 held in float32, written back as those
    # decimals: observed relative differences 4.4e-8 and 7.7e-9, float32's representation error
    # (at most 2^-24 = 6e-8); zmax_rel is one float32 ulp, 2^-23
    zmax_rel = 1.2e-7
    assert own[0]["data"][0]["zmax"] == pytest.approx(small.effect_matrix.abs().max().item(),
                                                      rel=zmax_rel)
    assert own[0]["data"][0]["zmax"] < own[1]["data"][0]["zmax"]
    assert shared[0]["data"][0]["zmax"] == shared[1]["data"][0]["zmax"] == pytest.approx(
        vmax, rel=zmax_rel)
    assert shared[2]["data"][0]["zmax"] == own[2]["data"][0]["zmax"]  # raw values: own group
    assert shared[0]["scale"] == {"own": own[0]["data"][0]["zmax"], "shared": pytest.approx(
        vmax, rel=zmax_rel)}
    assert "id='cp-shared-scale' checked" in report([small, big], shared_scale=True)
    assert "id='cp-shared-scale'" not in report([small])  # nothing to share with


def test_plotly_from_the_cdn_makes_a_small_page():
    from plotly.offline import get_plotlyjs, get_plotlyjs_version

    result = ioi_like((30, 9), ("layer", "head"), "attn_head")
    page = report(result, plotly="cdn")
    assert len(page.encode()) < 200_000 and get_plotlyjs()[:2000] not in page
    url = f"https://cdn.plot.ly/plotly-{get_plotlyjs_version()}.min.js"
    assert f"<script src='{url}'" in page
    csp = re.search(r'http-equiv=.Content-Security-Policy. content="([^"]*)"', page).group(1)
    assert "script-src https://cdn.plot.ly 'sha256-" in csp
    assert len(scripts_of(page)) == 3 and len(figures_of(page)) == 1
    assert len(report(result).encode()) > 4_000_000  # inline is the default
    with pytest.raises(InvalidArgumentError, match="plotly"):
        report(result, plotly="web")
    assert result.to_html(plotly="cdn") .count(url) == 1


def test_write_report_from_saved_json_files(tmp_path):
    heads = with_pairs(ioi_like((6, 4), ("layer", "head"), "attn_head"))
    resid = with_pairs(ioi_like((6, 14), ("layer", "position"), "resid_post", 1))
    paths = [heads.save(tmp_path / "heads.json"), str(resid.save(tmp_path / "resid.json"))]
    page = write_report(paths, tmp_path / "report.html", title="IOI", plotly="cdn")
    assert (tmp_path / "report.html").read_text() == page
    loaded = [PatchingResult.from_json(p) for p in paths]
    assert loaded == [heads, resid]
    assert page == report(loaded, title="IOI", plotly="cdn")
    # answers, roles and per-pair views survive the JSON round trip
    assert "' Mary' (correct)" in html.unescape(page) and "roles shared by all 3 pairs" in page
    assert len(figures_of(page)[1]["pairs"]["views"]) == 3
    assert write_report([loaded[0], paths[1]], plotly="cdn", title="IOI") == page  # mixed
    (tmp_path / "bad.json").write_text("{}")
    from causalpatch.errors import CorruptResultError

    with pytest.raises(CorruptResultError, match="bad.json"):
        write_report([tmp_path / "bad.json"])
    with pytest.raises(FileNotFoundError):
        write_report([tmp_path / "missing.json"])


def test_chromium_renders_the_pair_view_roles_takeaway_and_shared_scale(tmp_path):
    """The per-pair selector (preselected by ``#pair-0=2``) restyles the pair plot and fills
    in that pair's prompts; roles are drawn as tick labels; with ``shared_scale`` the heatmaps
    are drawn on one colour range; nothing on the console."""
    resid = with_pairs(ioi_like((12, 14), ("layer", "position"), "resid_post"))
    heads = with_pairs(ioi_like((12, 14, 4), ("layer", "position", "head"), "attn_head", 1))
    heads.effect_matrix *= 0.5
    heads.per_pair *= 0.5
    hostile = with_pairs(hostile_result(), roles=False)
    hostile.clean_prompts = [HOSTILE[0]] * 3
    bars = with_pairs(ioi_like((12,), ("layer",), "mlp_out", 2))
    path = tmp_path / "pairs.html"
    report([resid, heads, hostile, bars], path, shared_scale=True)
    dom = chromium(path, tmp_path, "--dump-dom", fragment="pair-0=2&pair-1=1&pair-3=2")
    expected = [f"{kind}plot-{i}" for i in range(4) for kind in ("", "pair")]
    assert page_problems(dom, expected) == [], dom.stderr[-3000:]
    scan = _PlotScan()
    scan.feed(dom.stdout)
    # the preselected pairs were drawn, and their prompts shown
    assert scan.attrs["pairplot-0"]["data-pair"] == "2"
    assert scan.attrs["pairplot-1"]["data-pair"] == "1"
    assert scan.attrs["pairplot-3"]["data-pair"] == "2"
    info = dom.stdout.split('id="pair-info-0"')[1].split("</table>")[0]
    assert html.escape(IOI_CLEAN[2], quote=False) in info and "Lisa" in info
    assert html.escape(IOI_CLEAN[0], quote=False) not in info
    # roles were drawn as tick labels of the mean heatmap
    plot0 = dom.stdout.split('id="plot-0"')[1].split('id="pairplot-0"')[0]
    assert "9: S2" in plot0 and "13: END" in plot0 and "position (role)" in plot0
    # one colour range for the normalised heatmaps (resid, heads, hostile)
    zmax = [float(scan.attrs[f"plot-{i}"]["data-zmax"]) for i in range(3)]
    # the page writes 5 significant digits (rounding up to 5e-5 relative): observed 5.8e-6
    # (1.6908 for 1.69079); 5e-5 is 8.6x that
    assert zmax[0] == zmax[1] == zmax[2] == pytest.approx(
        max(r.effect_matrix.abs().max().item() for r in (resid, heads, hostile)), rel=5e-5)
    assert 'id="cp-shared-scale" checked' in dom.stdout
    # the takeaway is on the page; hostile prompts in the pair view stayed text
    assert dom.stdout.count('class="takeaway"') == 4 and "recovers" in dom.stdout
    info2 = dom.stdout.split('id="pair-info-2"')[1].split("</table>")[0]
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in info2


@pytest.mark.real
def test_ioi_dataset_roles_reach_the_report(smollm2):
    """IOI's per-token roles (Wang et al.'s IO, S1, S1+1, S2, END) as the report consumes them."""
    from causalpatch.datasets import IOIDataset, dataset_roles

    data = IOIDataset(smollm2, n=4, seed=0, equal_length=True, order="ABBA")
    roles = dataset_roles(data)
    tokens = smollm2.to_str_tokens(data.clean[0])
    assert len(roles[0]) == len(tokens) and roles[0][-1] == "END"
    named = {r: tokens[i] for i, r in enumerate(roles[0]) if r}
    assert named["IO"] == " " + data.io_names[0] and named["S1"] == named["S2"] == (
        " " + data.subject_names[0])
    assert roles[0].index("S1+1") == roles[0].index("S1") + 1
    assert all(r == roles[0] for r in roles)  # one template, one order: every pair agrees
    mixed = IOIDataset(smollm2, n=4, seed=0, equal_length=True)  # ABBA and BABA
    assert mixed.roles[0] != mixed.roles[1] and mixed.subset([1]).roles == [mixed.roles[1]]


# -- each method's story: titles, estimates, ablation kinds, causal tracing, summary, lens/DLA ---
#: The token ids of the path-patching tests' pair (``small_llama``: a 3-layer token-id LLaMA).
PP_CLEAN, PP_CORRUPTED = [5, 6, 7, 8, 9, 10, 11, 12], [5, 6, 7, 20, 9, 10, 21, 12]
PP_ANSWERS = dict(correct=3, incorrect=4)


@pytest.fixture(scope="module")
def stories(small_llama):
    """Real results of every method on the 3-layer token-id LLaMA (a few seconds), on one
    torch thread; the rest of the session keeps its thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _stories(small_llama)
    finally:
        torch.set_num_threads(before)


def _stories(small_llama) -> dict:
    from causalpatch.methods.ablation import ablate
    from causalpatch.methods.attribution import attribution_patching
    from causalpatch.methods.causal_tracing import causal_tracing
    from causalpatch.methods.lens import direct_logit_attribution, logit_lens
    from causalpatch.methods.path_patching import path_patching

    pair = ([PP_CLEAN], [PP_CORRUPTED])
    return {
        "path_q": path_patching(small_llama, *pair, senders="attn_head", receivers=[(2, 1)],
                                receiver_input="q", **PP_ANSWERS),
        "path_logits": path_patching(small_llama, *pair, senders="attn_head",
                                     receivers="logits", **PP_ANSWERS),
        "path_logits_all": path_patching(small_llama, *pair, senders="attn_head",
                                         receivers="logits", freeze="all", **PP_ANSWERS),
        "mean": ablate(small_llama, [PP_CLEAN, PP_CORRUPTED], "attn_head", "mean",
                       **PP_ANSWERS),
        "zero": ablate(small_llama, [PP_CLEAN, PP_CORRUPTED], "mlp", "zero", **PP_ANSWERS),
        "atp": attribution_patching(small_llama, *pair, component="attn_head", verify_top_k=3,
                                    **PP_ANSWERS),
        "atp*": attribution_patching(small_llama, *pair, component="attn_head", method="atp*",
                                     verify="auto", top_k=3, **PP_ANSWERS),
        "trace": causal_tracing(small_llama, "t5 t6 t7 t8 t9 t10 t11", "t6 t7", samples=3,
                                window=2, position_groups=False),
        "trace2": causal_tracing(small_llama, ["t5 t6 t7 t8 t9 t10 t11", "t4 t6 t9 t3 t8 t8 t2"],
                                 ["t6 t7", "t6"], samples=2, window=2, position_groups=False),
        "lens": logit_lens(small_llama, PP_CLEAN, answer=3),
        "dla": direct_logit_attribution(small_llama, PP_CLEAN, "head", **PP_ANSWERS),
    }


def sections_of(page: str) -> dict[str, str]:
    """Section id -> its HTML, with the collapsed metadata (``<details>``) removed."""
    found = re.findall(r"<section id='(result-\d+)'[^>]*>(.*?)</section>", page, flags=re.DOTALL)
    return {k: re.sub(r"<details>.*?</details>", "", v, flags=re.DOTALL) for k, v in found}


def test_path_patching_titles_name_senders_receivers_and_freeze(stories):
    """Two path-patching sections never share a title: it says senders -> receivers (and the
    receivers' input) and what is frozen; the receivers are on the page, not only in the
    collapsed metadata."""
    from causalpatch.render.html import result_title

    results = [stories["path_q"], stories["path_logits"], stories["path_logits_all"]]
    titles = [result_title(r) for r in results]
    assert len(set(titles)) == 3, titles
    assert titles[0].startswith("Path patching: attention heads → L2H1 via q, other heads "
                                "frozen")
    assert "→ logits (direct path), other heads frozen" in titles[1]
    assert "→ logits (direct path), other heads and MLPs frozen" in titles[2]
    page = report(results, plotly="cdn")
    visible = sections_of(page)
    assert "receivers: L2H1 via q" in visible["result-0"]
    assert "receivers: logits (direct path)" in visible["result-1"]
    assert "frozen: every other attn.z and every mlp output" in visible["result-2"]
    assert [f["layout"]["title"]["text"] for f in figures_of(page)] == [
        html.escape(t, quote=False) for t in titles]


def test_attribution_values_are_labelled_estimates_with_exact_beside(stories):
    """Title, takeaway and table call attribution's values estimates; each verified cell shows
    its exact value beside the estimate (``verify_top_k`` and screen-then-prove alike)."""
    from causalpatch.render.html import figure_spec, result_title, top_table
    from causalpatch.render.markdown import md_text
    from causalpatch.render.text import cell_words

    for key, words in (("atp", "AtP estimates"), ("atp*", "AtP* estimates")):
        result = stories[key]
        verified = result.extra["verified"]
        assert verified, key
        assert f"Attribution patching ({words})" in result_title(result)
        text = result.takeaway()
        assert "estimated" in text and f"These are {words}" in text
        assert f"{len(verified)} cells were verified" in text
        (c0, v0), *_ = result.top_cells(1)
        entry = next(e for e in verified if tuple(e["cell"]) == c0)  # the top cell is verified
        assert v0 < 0  # on this model the largest cell pushes the wrong way (-147% exact)
        assert (f"{cell_words(result, c0)} has the largest effect, an estimated "
                f"{entry['estimate'] * 100:+.0f}% (exact {entry['exact'] * 100:+.0f}%)" in text)
        c1, v1 = result.top_cells(2)[1]  # "Next:" names the second cell's estimate and exact
        second = next(e for e in verified if tuple(e["cell"]) == c1)
        assert (f"{cell_words(result, c1)} (estimated {second['estimate'] * 100:+.0f}%, exact "
                f"{second['exact'] * 100:+.0f}%)" in text)
        table = top_table(result)
        assert "<th>estimate</th><th>exact</th>" in table and "<th>effect</th>" not in table
        for e in verified[:3]:
            assert f"<td class='num'>{e['exact']:+.4f}</td>" in table
            assert f"<td class='num'>{e['estimate']:+.4f}</td>" in table
        spec = figure_spec(result)["data"][0]
        assert spec["colorbar"]["title"]["text"] == "estimate" and "estimate %{z" in (
            spec["hovertemplate"])
        md = result.to_markdown()
        assert f"- **what**: Attribution patching ({md_text(words)})" in md
        assert "- verified exactly: layer" in md and "exact" in md
    bound = stories["atp*"].extra["missed_bound"]
    assert (f"|effect| ≤ {bound['max_abs_effect'] * 100:.0f}%"
            in stories["atp*"].takeaway())


def test_ablation_title_has_its_kind_and_takeaway_its_baseline(stories):
    from causalpatch.render.html import result_title

    mean, zero = stories["mean"], stories["zero"]
    assert result_title(mean).startswith("Mean ablation: attention heads")
    assert result_title(zero).startswith("Zero ablation: MLP output")
    base = mean.clean_metric
    # observed bitwise 0: the baseline is the mean of the two pairs' metrics, the same two
    # float additions and one halving in either order
    assert_within(base, sum(mean.extra["original_metric"]) / 2, 0.0, "baseline")
    (c0, v0), *_ = mean.top_cells(1)
    assert (f"changes the logit difference from {base:.3g} to {base + v0:.3g} ({v0:+.3g}"
            in mean.takeaway())
    assert mean.takeaway().startswith("Mean-ablating attention heads: ablating layer")
    page = report([mean, zero], plotly="cdn")
    assert "ablation kind: mean" in sections_of(page)["result-0"]
    assert f"baseline logit difference (nothing ablated): {base:.4g}" in page


def test_causal_tracing_speaks_romes_terms_and_draws_as_its_png(stories):
    """Indirect effect (not "a probability"), the subject-noised baseline, the subject marked,
    noise and window shown; the HTML heatmap has the PNG's orientation (positions down, layers
    across) and its sequential colour map from 0."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    from causalpatch.render.html import compact_html, figure_spec
    from causalpatch.render.plots import TRACE_CMAPS

    traced = stories["trace"]
    mlp = traced["mlp"]
    text = mlp.takeaway()
    assert "probability of" not in text and "has the largest indirect effect" in text
    (c0, v0), *_ = mlp.top_cells(1)
    assert (f"p(answer) goes from {mlp.corrupted_metric:.3g} (subject noised) to "
            f"{mlp.corrupted_metric + v0:.3g}") in text
    assert "MLP output (window of 2 layers)" in text and "subject 't6 t7'" in text
    page = report(list(traced.values()), plotly="cdn")
    visible = sections_of(page)["result-1"]
    for words in ("subject &#x27;t6 t7&#x27; (tokens 1–2, marked * on the position axis)",
                  "noise 3 x the embeddings&#x27; std", "window: 2 layers restored together",
                  f"subject noised {mlp.corrupted_metric:.4f}"):
        assert words in visible, words
    spec = figure_spec(mlp)
    trace = spec["data"][0]
    # the page keeps 5 significant digits, whose rounding reaches 5e-5 relative: observed 3.3e-5
    # (and 3 cells exactly 0); 1e-4 is 3x that
    assert torch.allclose(torch.tensor(trace["z"], dtype=torch.float64),
                          mlp.effect_matrix.double().T, rtol=1e-4, atol=0.0)
    assert trace["y"][1].endswith("*") and not trace["y"][0].endswith("*")  # subject marked
    assert spec["layout"]["yaxis"]["autorange"] == "reversed"  # first token on top, as imshow
    assert trace["zmin"] == 0.0 and trace["zmax"] > 0
    for component, result in traced.items():
        scale = figure_spec(result)["data"][0]["colorscale"]
        cmap = colormaps[TRACE_CMAPS[component]]
        assert scale[0][1] == to_hex(cmap(0.0)) and scale[-1][1] == to_hex(cmap(1.0))
    assert "0 = subject noised" in trace["colorbar"]["title"]["text"]
    # several prompts: each prompt's own view is drawn the same way, its own subject marked
    from causalpatch.render.html import pair_view

    two = stories["trace2"]["mlp"]
    view = pair_view(two)
    assert view["data"][0]["colorscale"] == trace["colorscale"]
    assert view["data"][0]["zmin"] == 0.0 and view["layout"]["yaxis"]["autorange"] == "reversed"
    assert [t.endswith("*") for t in view["views"][1]["y"][0]][:3] == [False, True, False]
    assert [t.endswith("*") for t in view["views"][0]["y"][0]][:3] == [False, True, True]
    # 5 significant digits again: observed 4.1e-5 relative; 1e-4 is 2.5x that
    assert torch.allclose(torch.tensor(view["views"][1]["z"][0], dtype=torch.float64),
                          two.per_pair[1].double().T, rtol=1e-4, atol=0.0)
    notebook = traced._repr_html_()
    assert "indirect effect" in notebook and "gives a probability" not in notebook
    assert "p(answer): clean run" in compact_html(mlp)


def test_summary_opens_a_multi_section_report_one_line_each(stories):
    results = [stories[k] for k in ("path_q", "path_logits", "mean", "atp*", "lens", "dla")]
    page = report(results, plotly="cdn")
    summary = page.split("<section id='summary'>")[1].split("</section>")[0]
    lines = re.findall(r"<li><a href='#result-(\d+)'>(.*?)</a>: (.*?)</li>", summary)
    assert [int(i) for i, _, _ in lines] == list(range(len(results)))
    assert len({title for _, title, _ in lines}) == len(results)  # distinct titles
    assert page.index("id='summary'") < page.index("id='prompts'") < page.index("id='result-0'")
    assert "estimated" in lines[3][2] and "from" in lines[2][2]
    assert "Logit lens:" in lines[4][1] and "rank" in lines[4][2]
    assert "Direct logit attribution (head)" in lines[5][1] and "largest part" in lines[5][2]
    mixed = report([stories["mean"], stories["trace"]], plotly="cdn")  # a trace's components
    assert mixed.count("<li><a href='#result-") == 1 + len(stories["trace"])
    single = report([stories["mean"]], plotly="cdn")
    assert "id='summary'" not in single


def test_lens_and_dla_are_report_sections(stories, tmp_path):
    lens, dla = stories["lens"], stories["dla"]
    page = report([lens, dla], tmp_path / "r.html", plotly="cdn")
    visible = sections_of(page)
    assert "Logit lens —" in visible["result-0"] and "class='cp-lens'" in visible["result-0"]
    assert f"{dla.logit_diff:.4f}" in visible["result-1"]
    assert figures_of(page) == [None, None] and "id='prompts'" not in page
    alone = report(lens, plotly="cdn")  # one lens result on its own
    assert "id='result-0'" in alone
    hostile = copy_with(lens, prompt=HOSTILE[0])
    outside = re.sub(r"<script[^>]*>.*?</script>", "", report([hostile, dla], plotly="cdn"),
                     flags=re.DOTALL)
    assert "<script>alert" not in outside and html.escape(repr(HOSTILE[0])) in outside


def copy_with(result, **changes):
    import dataclasses

    return dataclasses.replace(result, **changes)


def test_chromium_renders_every_methods_story(stories, tmp_path):
    """A report of every method (path patching, ablation, attribution, causal tracing, lens,
    DLA) renders in headless Chromium with nothing on the console: every heatmap drawn, the
    summary lists one line per section."""
    results = [stories[k] for k in ("path_q", "path_logits", "mean", "zero", "atp", "atp*")]
    results += [*stories["trace"].values(), stories["trace2"]["attn"], stories["lens"],
                stories["dla"]]
    path = tmp_path / "stories.html"
    report(results, path, title="every method")
    dom = chromium(path, tmp_path, "--dump-dom", fragment="pair-9=1")
    plotted = [f"plot-{i}" for i in range(len(results) - 2)] + ["pairplot-9"]
    assert page_problems(dom, plotted) == [], dom.stderr[-3000:]
    summary = dom.stdout.split('id="summary"')[1].split("</section>")[0]
    assert summary.count("<li>") == len(results)
    assert 'id="plot-10"' not in dom.stdout and 'class="cp-lens"' in dom.stdout
    scan = _PlotScan()
    scan.feed(dom.stdout)
    assert scan.attrs["pairplot-9"]["data-pair"] == "1"  # the second prompt's trace was drawn


def test_new_story_fields_are_escaped(tmp_path):
    """A hostile subject reaches the title, takeaway, run list, summary and figure of a
    causal-tracing section only as text."""
    labels = {"layer": [0, 1], "position": ["0: 'a'", "1: 'b'*", "2: 'c'"]}
    traced = PatchingResult(
        effect_matrix=torch.tensor([[0.0, 0.2, 0.1], [0.0, 0.05, 0.3]]),
        axes=("layer", "position"), labels=labels, component="mlp", metric="prob",
        method="causal_tracing", normalized=False, clean_metric=0.5, corrupted_metric=0.1,
        clean_prompts=[HOSTILE[1]], extra={
            "subjects": [HOSTILE[0]], "subject_spans": [[1, 2]], "noise": 3.0, "sigma": 0.5,
            "samples": 2, "window": 2, "n_prompts": 1, "positions": [0, 1, 2]})
    page = report([traced, traced], tmp_path / "r.html", plotly="cdn")
    outside = re.sub(r"<script[^>]*>.*?</script>", "", page, flags=re.DOTALL)
    assert "<script>alert" not in outside and "<img" not in outside
    assert outside.count(html.escape(repr(HOSTILE[0]))) >= 5  # titles, takeaways, runs, summary
    titles = re.findall(r"<h2>\d\. (.*?)</h2>", page)
    assert len(titles) == 2 and titles[1] == titles[0] + " (2)"  # the same run twice
    drawn = figures_of(page)[0]["layout"]["title"]["text"]
    assert "<script>" not in drawn and "&lt;script&gt;" in drawn
