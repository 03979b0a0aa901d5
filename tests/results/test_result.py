"""PatchingResult: JSON round trips, rejection of damaged files, tables, plots and saving.

No model is loaded: results are built from seeded random tensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from causalpatch import _io
from causalpatch.errors import (
    CorruptResultError,
    InvalidArgumentError,
    InvalidTypeError,
    NonFiniteError,
)
from causalpatch.result import FORMAT, VERSION, PatchingResult

TOKENS = ["<|endoftext|>", "When", " Mary", " and", " John", " went", " to", " the", " store"]


def make(shape: tuple[int, ...], seed: int = 0, *, with_std: bool = False,
         n_pairs: int = 0, axes: tuple[str, ...] | None = None,
         layers: list[int] | None = None) -> PatchingResult:
    """A result of the given shape with realistic labels and metadata."""
    if axes is None:
        axes = {1: ("layer",), 2: ("layer", "head"), 3: ("layer", "position", "head")}[len(shape)]
    g = torch.Generator().manual_seed(seed)
    labels: dict = {"layer": layers if layers is not None else list(range(shape[0]))}
    positions = None
    for axis, n in zip(axes[1:], shape[1:]):
        if axis == "position":
            positions = [2 * i + 1 for i in range(n)]  # token positions differ from indices
            labels["position"] = [f"{p}: {TOKENS[p % len(TOKENS)]!r}" for p in positions]
        else:
            labels[axis] = list(range(n))
    per_pair = torch.randn(n_pairs, *shape, generator=g) if n_pairs else None
    effect = per_pair.mean(0) if per_pair is not None else torch.randn(*shape, generator=g)
    return PatchingResult(
        effect_matrix=effect, axes=axes, labels=labels, component="attn_head",
        metric="logit_diff", model_name="tiny-model", clean_prompts=["When Mary and John"],
        corrupted_prompts=["When Mary and Anne"], clean_tokens=[TOKENS[:5]],
        clean_metric=2.5, corrupted_metric=-1.25, per_pair=per_pair,
        std=effect.abs() / 10 if with_std else None,
        timings={"setup_s": 0.25, "run_s": 1.5},
        extra={"positions": positions, "n_pairs": max(n_pairs, 1), "versions": {"torch": "x"}})


def rewrite(text: str, edit) -> str:
    """Apply ``edit`` to the payload of a saved result and re-sign it (a consistent forgery)."""
    doc = json.loads(text)
    edit(doc["result"])
    body = json.dumps(doc["result"], sort_keys=True, allow_nan=False)
    doc["sha256"] = hashlib.sha256(body.encode()).hexdigest()
    return json.dumps(doc)


# -- JSON round trips --------------------------------------------------------------------------
@st.composite
def results(draw):
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim)))
    axes = {1: ("layer",), 2: draw(st.sampled_from([("layer", "head"), ("layer", "position"),
                                                      ("layer", "neuron")])),
            3: ("layer", "position", "head")}[ndim]
    layers = sorted(draw(st.sets(st.integers(0, 40), min_size=shape[0], max_size=shape[0])))
    return make(shape, draw(st.integers(0, 10_000)), with_std=draw(st.booleans()),
                n_pairs=draw(st.sampled_from([0, 2, 3])), axes=axes, layers=layers)


@settings(max_examples=40, deadline=None)
@given(results())
def test_json_round_trip_is_exact(result):
    text = result.to_json()
    back = PatchingResult.from_json(text)
    assert back == result
    assert torch.equal(back.effect_matrix, result.effect_matrix)
    assert back.effect_matrix.dtype == torch.float32
    assert back.labels == result.labels and back.axes == result.axes
    assert (back.std is None) == (result.std is None)
    assert (back.per_pair is None) == (result.per_pair is None)
    assert back.to_json() == text  # stable: saving again gives the same bytes


@pytest.mark.parametrize("shape", [(7,), (4, 3), (3, 4, 2)])
def test_file_round_trip_for_1d_2d_3d(tmp_path, shape):
    result = make(shape, with_std=True, n_pairs=2)
    path = tmp_path / "r.json"
    assert result.save(path) == path
    back = PatchingResult.from_json(path)
    assert back == result
    assert PatchingResult.from_json(str(path)) == result
    assert PatchingResult.from_json(path.read_bytes()) == result
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temp files left
    doc = json.loads(path.read_text())
    assert doc["format"] == FORMAT and doc["version"] == VERSION and len(doc["sha256"]) == 64


def test_equality_compares_tensors_and_fields():
    a, b = make((3, 4)), make((3, 4))
    assert a == b
    b.effect_matrix[0, 0] += 1
    assert a != b
    assert make((3, 4)) != make((3, 4), with_std=True)
    assert a != "not a result"


# -- damaged files -------------------------------------------------------------------------------
@pytest.mark.parametrize("keep", [0.0, 0.01, 0.5, 0.9, -1])
def test_truncated_file_is_rejected(tmp_path, keep):
    text = make((3, 4), with_std=True).to_json()
    cut = len(text.rstrip()) - 1 if keep == -1 else int(len(text) * keep)
    path = tmp_path / "r.json"
    path.write_text(text[:cut])
    with pytest.raises(CorruptResultError, match="not valid JSON|empty"):
        PatchingResult.from_json(path)


def test_empty_text_and_binary_garbage_are_rejected(tmp_path):
    with pytest.raises(CorruptResultError, match="empty"):
        PatchingResult.from_json("")
    path = tmp_path / "r.json"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(CorruptResultError, match="UTF-8"):
        PatchingResult.from_json(path)
    with pytest.raises(FileNotFoundError):
        PatchingResult.from_json(tmp_path / "missing.json")


def test_hand_edited_value_fails_the_checksum():
    doc = json.loads(make((3, 4)).to_json())
    doc["result"]["effect_matrix"][0][0] = 123.0
    with pytest.raises(CorruptResultError, match="checksum"):
        PatchingResult.from_json(json.dumps(doc))
    doc = json.loads(make((3, 4)).to_json())
    doc["result"]["model_name"] = "other"
    with pytest.raises(CorruptResultError, match="edited or damaged"):
        PatchingResult.from_json(json.dumps(doc))
    del doc["sha256"]
    with pytest.raises(CorruptResultError, match="no sha256 checksum"):
        PatchingResult.from_json(json.dumps(doc))


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_numbers_are_rejected(constant):
    text = make((3, 4)).to_json()
    assert '"clean_metric": 2.5' in text
    with pytest.raises(CorruptResultError, match="non-finite|not valid JSON"):
        PatchingResult.from_json(text.replace('"clean_metric": 2.5', f'"clean_metric": {constant}'))
    doc = json.loads(text)
    first = doc["result"]["effect_matrix"][0][0]
    bad = text.replace(json.dumps(first), constant, 1)
    with pytest.raises(CorruptResultError):
        PatchingResult.from_json(bad)


def test_missing_fields_are_rejected_even_when_re_signed():
    text = make((3, 4)).to_json()
    for name in ("effect_matrix", "axes", "labels", "component", "metric"):
        with pytest.raises(CorruptResultError, match=f"missing the fields.*{name}"):
            PatchingResult.from_json(rewrite(text, lambda p, n=name: p.pop(n)))
    with pytest.raises(CorruptResultError, match="unknown fields"):
        PatchingResult.from_json(rewrite(text, lambda p: p.update(surprise=1)))


@pytest.mark.parametrize("edit", [
    lambda p: p["labels"].update(layer=[0, 1]),               # 3 rows, 2 labels
    lambda p: p["effect_matrix"].pop(),                        # 2 rows, 3 labels
    lambda p: p["effect_matrix"][0].pop(),                     # ragged matrix
    lambda p: p.update(std=[[0.0] * 4] * 2),                   # std of the wrong shape
    lambda p: p.update(per_pair=[[0.0] * 4] * 3),              # per_pair without a pair axis
    lambda p: p.update(axes=["layer"]),                        # 2-D matrix, one axis
    lambda p: p.update(axes=["layer", "layer"]),               # repeated axis
    lambda p: p.update(effect_matrix="oops"),                  # not numbers
    lambda p: p.update(effect_matrix=[[None] * 4] * 3),        # nulls
    lambda p: p.update(clean_metric="2.5"),                    # wrong type
    lambda p: p.update(clean_tokens=["a b"]),                  # not a list of lists
    lambda p: p.update(labels=[0, 1, 2]),                      # not an object
    lambda p: p.update(timings={"run_s": "fast"}),             # not a number
], ids=["labels", "rows", "ragged", "std", "per_pair", "axes", "repeated", "text", "nulls",
        "metric-type", "tokens", "labels-type", "timings"])
def test_wrong_shapes_and_types_are_rejected_even_when_re_signed(edit):
    text = make((3, 4)).to_json()
    with pytest.raises(CorruptResultError):
        PatchingResult.from_json(rewrite(text, edit))


def test_not_a_result_and_other_versions_are_rejected():
    with pytest.raises(CorruptResultError, match="not a causalpatch result"):
        PatchingResult.from_json('{"format": "other"}')
    with pytest.raises(CorruptResultError, match="not a causalpatch result"):
        PatchingResult.from_json("[1, 2]")
    doc = json.loads(make((2,)).to_json())
    doc["version"] = VERSION + 1
    with pytest.raises(CorruptResultError, match="upgrade causalpatch"):
        PatchingResult.from_json(json.dumps(doc))


def test_saving_non_finite_values_is_a_clear_error(tmp_path):
    result = make((3, 4))
    result.effect_matrix[1, 1] = float("nan")
    with pytest.raises(NonFiniteError, match="effect_matrix holds 1 NaN"):
        result.to_json(tmp_path / "r.json")
    assert list(tmp_path.iterdir()) == []
    result = make((3,))
    result.extra["bad"] = [1.0, float("inf")]
    with pytest.raises(NonFiniteError, match=r"extra\['bad'\]\[1\]"):
        result.to_json()
    result = make((3,))
    result.extra["tensor"] = object()
    with pytest.raises(InvalidTypeError, match="extra"):
        result.to_json()


def test_extra_with_arrays_and_tuples_is_stored_as_lists():
    result = make((3,))
    result.extra["kept"] = torch.tensor([1.0, 2.0])
    result.extra["pair"] = (1, 2)
    back = PatchingResult.from_json(result.to_json())
    assert back.extra["kept"] == [1.0, 2.0] and back.extra["pair"] == [1, 2]


# -- construction --------------------------------------------------------------------------------
def test_constructor_validates_and_normalises():
    result = PatchingResult(torch.ones(3, 2, dtype=torch.float64), ["layer", "head"],
                            {"layer": (4, 5, 6)}, "attn_head", "logit_diff")
    assert result.effect_matrix.dtype == torch.float32 and result.axes == ("layer", "head")
    assert result.labels == {"layer": [4, 5, 6], "head": [0, 1]}  # missing labels: 0..n-1
    assert result.layers == [4, 5, 6] and result.heads == [0, 1] and result.positions is None
    assert result.shape == (3, 2)
    with pytest.raises(InvalidArgumentError, match="3 entries but 2 labels"):
        PatchingResult(torch.ones(3), ("layer",), {"layer": [0, 1]}, "mlp", "l2")
    with pytest.raises(InvalidArgumentError, match="dimensions"):
        PatchingResult(torch.ones(3), ("layer", "head"), {}, "mlp", "l2")
    with pytest.raises(InvalidArgumentError, match="empty"):
        PatchingResult(torch.ones(()), (), {}, "mlp", "l2")
    with pytest.raises(InvalidArgumentError, match="per_pair"):
        PatchingResult(torch.ones(3), ("layer",), {}, "mlp", "l2", per_pair=torch.ones(3))
    with pytest.raises(InvalidTypeError, match="axes"):
        PatchingResult(torch.ones(3), "layer", {}, "mlp", "l2")


# -- queries -------------------------------------------------------------------------------------
def test_top_components_orders_by_magnitude_and_uses_labels():
    m = torch.tensor([[0.1, -0.9], [0.5, 0.2]])
    result = PatchingResult(m, ("layer", "head"), {"layer": [10, 11], "head": [0, 1]},
                            "attn_head", "logit_diff")
    assert result.top_components(2) == [((10, 1), pytest.approx(-0.9)),
                                        ((11, 0), pytest.approx(0.5))]
    assert [i for i, _ in result.top_components(by="value")] == [(11, 0), (11, 1), (10, 0),
                                                                 (10, 1)]
    assert len(result.top_components(100)) == 4 and result.top_components(0) == []
    with pytest.raises(InvalidArgumentError, match="by"):
        result.top_components(by="size")
    per_layer = PatchingResult(torch.tensor([0.1, 0.7, float("nan")]), ("layer",),
                               {"layer": [3, 4, 5]}, "mlp", "l2")
    assert per_layer.top_components(1)[0][0] == 4  # bare layer number for 1-D results
    assert per_layer.top_components(3)[-1][0] == 5  # NaN last


def test_top_components_report_token_positions_for_the_position_axis():
    result = make((2, 3), axes=("layer", "position"))
    result.effect_matrix.zero_()
    result.effect_matrix[1, 2] = -5.0
    (index, effect), = result.top_components(1)
    assert index == (1, 5) and effect == -5.0  # position index 2 is token position 5
    assert result.describe_index(index) == "layer 1, position 5: ' went'"


def test_summary_names_everything():
    result = make((3, 4), with_std=True)
    text = result.summary()
    for part in ("activation_patching", "'attn_head'", "tiny-model", "logit_diff", "denoise",
                 "clean 2.5000", "corrupted -1.2500", "3 x 4 (layer x head)", "top 5",
                 "setup 0.25 s", "std"):
        assert part in text, part
    layer, head = result.top_components(1)[0][0]
    assert f"layer {layer}, head {head}:" in text


# -- tables --------------------------------------------------------------------------------------
def test_markdown_has_header_and_numbers_table_1d_2d_3d():
    one = make((4,), with_std=True).to_markdown()
    assert "| layer | effect | std |" in one and one.count("\n| ") == 5
    result = make((2, 3))
    md = result.to_markdown()
    assert "tiny-model" in md and "clean 2.5000" in md and "denoise" in md
    assert "| layer \\\\ head | 0 | 1 | 2 |" in md
    row = "| 1 | " + " | ".join(f"{v:+.3f}" for v in result.effect_matrix[1].tolist()) + " |"
    assert row in md
    three = make((2, 3, 2)).to_markdown()
    assert three.count("| layer \\\\ head |") == 3 and "**position 1: 'When'**" in three


def test_markdown_escapes_and_truncates():
    result = make((5, 2), axes=("layer", "position"))
    result.labels["position"] = ["1: '<b>|x'", "3: '*y*'"]
    result.corrupted_metric = None  # ablations have no corrupted run
    md = result.to_markdown(max_rows=2)
    assert "&lt;b&gt;\\|x" in md and "\\*y\\*" in md and "<b>" not in md
    assert "3 more rows not shown" in md
    assert "- **baselines**: clean 2.5000\n" in md


def test_dataframe_has_one_row_per_cell():
    result = make((2, 3, 4), with_std=True, axes=("layer", "position", "head"))
    df = result.to_dataframe()
    assert len(df) == 24
    assert list(df.columns) == ["layer", "position", "token", "head", "effect", "std"]
    row = df[(df["layer"] == 1) & (df["position"] == 5) & (df["head"] == 3)]
    assert len(row) == 1
    assert row["effect"].item() == pytest.approx(result.effect_matrix[1, 2, 3].item())
    assert row["std"].item() == pytest.approx(result.std[1, 2, 3].item())
    assert row["token"].item() == "5: ' went'"
    assert df["layer"].dtype.kind == "i" and df["effect"].dtype.kind == "f"


# -- plots ---------------------------------------------------------------------------------------
def _images(fig):
    return [im for ax in fig.axes for im in ax.images]


def test_plot_1d_is_a_bar_chart():
    from matplotlib.figure import Figure

    result = make((6,), with_std=True)
    fig = result.plot()
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert len(ax.patches) == 6
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(i) for i in range(6)]
    # the title says what was patched in words, on which model, over how many pairs
    title = ax.get_title()
    assert "attention heads" in title and "tiny-model" in title and "1 pair" in title
    assert "logit difference" in title and "attn_head" not in title
    assert ax.get_xlabel() == "layer"


@pytest.mark.parametrize("axes", [("layer", "head"), ("layer", "position")])
def test_plot_2d_heatmap_has_symmetric_colours_and_labels(axes):
    result = make((5, 4), axes=axes)
    fig = result.plot(title="custom title")
    (image,) = _images(fig)
    low, high = image.get_clim()
    assert low == pytest.approx(-high) and high == pytest.approx(
        result.effect_matrix.abs().max().item())
    ax = fig.axes[0]
    assert ax.get_title() == "custom title"
    xticks = [t.get_text() for t in ax.get_xticklabels()]
    assert xticks == [str(x) for x in result.labels[axes[1]]]
    assert [t.get_text() for t in ax.get_yticklabels()] == [str(i) for i in range(5)]
    assert ax.get_ylabel() == "layer" and axes[1] in ax.get_xlabel()
    assert image.get_cmap().name.startswith("RdBu")
    assert len(fig.axes) == 2  # the heatmap and its colour bar


def test_plot_3d_is_a_grid_of_heatmaps_on_one_scale():
    result = make((4, 3, 5), axes=("layer", "position", "head"))
    fig = result.plot()
    images = _images(fig)
    assert len(images) == 5  # one per head
    vmax = result.effect_matrix.abs().max().item()
    assert all(im.get_clim() == pytest.approx((-vmax, vmax)) for im in images)
    labels = {t.get_text() for ax in fig.axes for t in ax.get_xticklabels()}
    assert "1: 'When'" in labels and "5: ' went'" in labels
    assert {ax.get_title() for ax in fig.axes} >= {f"head {h}" for h in range(5)}
    width, height = fig.get_size_inches()
    assert width < 20 and height < 20


def test_plot_3d_into_given_axes_shows_the_largest_effect_over_heads():
    from matplotlib.figure import Figure

    result = make((4, 3, 5), axes=("layer", "position", "head"))
    fig = Figure()
    ax = fig.add_subplot()
    assert result.plot(ax=ax) is fig
    (image,) = ax.images
    shown = image.get_array()
    flat = result.effect_matrix
    expected = flat.gather(2, flat.abs().argmax(2, keepdim=True)).squeeze(2)
    assert torch.allclose(torch.as_tensor(shown.data, dtype=torch.float32), expected)
    assert "largest |effect| over head" in ax.get_title()


def test_plot_of_a_wide_neuron_result_stays_readable():
    result = make((6, 1500), axes=("layer", "neuron"))
    result.effect_matrix[0, 0] = float("nan")
    fig = result.plot()
    width, height = fig.get_size_inches()
    assert width <= 18 and height <= 14
    assert len(fig.axes[0].get_xticklabels()) <= 48


def test_plotting_changes_no_global_matplotlib_state():
    code = (
        "import sys, causalpatch, causalpatch.result\n"
        "assert 'matplotlib' not in sys.modules and 'plotly' not in sys.modules, 'import'\n"
        "import matplotlib, torch\n"
        "def rc():  # reading 'backend' would itself import pyplot\n"
        "    return {k: matplotlib.rcParams[k] for k in matplotlib.rcParams if k != 'backend'}\n"
        "before = rc()\n"
        "from causalpatch.result import PatchingResult\n"
        "r = PatchingResult(torch.randn(3, 4), ('layer', 'head'), {}, 'attn_head', 'l2')\n"
        "r.plot(); r._repr_html_()\n"
        "assert rc() == before, 'rcParams'\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_plot_returns_a_figure_whose_show_works():
    """``result.plot().show()`` works: the object-API figure is handed to pyplot on show()
    (a plain object-API Figure raises AttributeError there), also on matplotlib < 3.10."""
    code = (
        "import io, sys, torch\n"
        "from causalpatch.result import PatchingResult\n"
        "from matplotlib.figure import Figure\n"
        "figs = [PatchingResult(torch.randn(*shape), axes, {}, 'attn_head', 'l2').plot()\n"
        "        for shape, axes in [((3,), ('layer',)), ((3, 4), ('layer', 'head')),\n"
        "                            ((3, 2, 2), ('layer', 'position', 'head'))]]\n"
        "assert all(isinstance(fig, Figure) for fig in figs), figs\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot before show'\n"
        "import matplotlib.pyplot as plt\n"
        "for fig in figs:\n"
        "    fig.show()\n"
        "    assert fig.canvas.manager is not None and fig.number in plt.get_fignums()\n"
        "    fig.show()  # twice is fine\n"
        "    fig.savefig(io.BytesIO(), format='png')\n"
        "r = PatchingResult(torch.randn(3, 4), ('layer', 'head'), {}, 'attn_head', 'l2')\n"
        "real = plt.figure\n"
        "def old_figure(num=None, **kw):  # matplotlib 3.7-3.9 refuse unmanaged figures\n"
        "    if isinstance(num, Figure):\n"
        "        raise ValueError('The passed figure is not managed by pyplot')\n"
        "    return real(num, **kw)\n"
        "plt.figure = old_figure\n"
        "fig = r.plot()\n"
        "fig.show()\n"
        "assert fig.canvas.manager is not None and fig.number in plt.get_fignums()\n"
        "fig.savefig(io.BytesIO(), format='png')\n"
    )
    env = {**os.environ, "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_repr_html_is_small_with_plot_and_table():
    page = make((3, 4, 2), axes=("layer", "position", "head"))._repr_html_()
    assert "<img" in page and "data:image/png;base64," in page and "<table" in page
    assert len(page) < 200_000


# -- saving --------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".png", ".svg", ".pdf", ".json", ".md", ".html"])
def test_save_by_suffix_writes_atomically(tmp_path, suffix):
    path = tmp_path / f"out{suffix}"
    path.write_text("old")
    assert make((3, 4)).save(path) == path
    data = path.read_bytes()
    assert len(data) > 100 and data != b"old"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    signature = {".png": b"\x89PNG", ".svg": b"<?xml", ".pdf": b"%PDF", ".json": b"{",
                 ".md": b"###", ".html": b"<!DOCTYPE html>"}[suffix]
    assert data.startswith(signature)


def test_save_errors_name_the_allowed_suffixes(tmp_path):
    with pytest.raises(InvalidArgumentError, match=r"\.png.*\.svg.*\.pdf.*\.json.*\.md.*\.html"):
        make((3,)).save(tmp_path / "x.bmp")
    with pytest.raises(InvalidArgumentError, match="none"):
        make((3,)).save(tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make((3,)).save(tmp_path / "missing" / "x.json")


def test_atomic_write_keeps_the_old_file_when_the_rename_fails(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    path.write_text("old")

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(_io.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        make((3,)).to_json(path)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_atomic_write_gives_ordinary_permissions(tmp_path):
    mask = os.umask(0o022)
    os.umask(mask)
    path = tmp_path / "new.md"
    _io.atomic_write_text(path, "x")
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
    os.chmod(path, 0o600)
    _io.atomic_write_text(path, "y")  # an existing file keeps its mode
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_text() == "y"


# -- figures for papers, important cells, roles, answers -----------------------------------------
def test_plot_is_sized_for_a_paper_column_and_saves_png_svg_pdf(tmp_path):
    for shape in [(6,), (5, 4)]:
        fig = make(shape, n_pairs=3).plot()
        width, height = fig.get_size_inches()
        assert width == pytest.approx(3.4) and height < 7
        sizes = [t.get_fontsize() for ax in fig.axes for t in ax.get_xticklabels()]
        assert sizes and min(sizes) >= 6  # readable at print size
        assert "3 pairs" in fig.axes[0].get_title()
    fig = make((5, 4)).plot(width=7.0, title="")
    assert fig.get_size_inches()[0] == pytest.approx(7.0) and fig.axes[0].get_title() == ""
    signatures = {"png": b"\x89PNG", "svg": b"<?xml", "pdf": b"%PDF"}
    for fmt, magic in signatures.items():
        path = fig.save(tmp_path / f"f.{fmt}")
        assert path.read_bytes().startswith(magic)
    assert fig.save(tmp_path / "by-format", format="pdf").read_bytes().startswith(b"%PDF")
    assert make((3,)).save(tmp_path / "r.out", format="svg").read_bytes().startswith(b"<?xml")
    with pytest.raises(InvalidArgumentError, match="png, svg, pdf"):
        fig.save(tmp_path / "f.bmp")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "by-format", "f.pdf", "f.png", "f.svg", "r.out"]


def test_plot_vmax_sets_the_colour_range():
    (image,) = _images(make((5, 4)).plot(vmax=3.0))
    assert image.get_clim() == pytest.approx((-3.0, 3.0))


def test_important_returns_cells_over_the_threshold_sorted():
    result = make((3, 4))
    result.effect_matrix.zero_()
    result.effect_matrix[1, 2] = 0.42
    result.effect_matrix[2, 0] = -0.30
    result.effect_matrix[0, 3] = 0.10
    result.effect_matrix[0, 0] = 0.05
    result.effect_matrix[2, 3] = float("nan")
    cells = result.important(0.1)
    assert cells == [((1, 2), pytest.approx(0.42)), ((2, 0), pytest.approx(-0.30)),
                     ((0, 3), pytest.approx(0.10))]  # |effect| >= threshold, NaN left out
    top = cells[0]
    (layer, head), effect = top
    assert (layer, head, top.layer, top.head, top.name, top.hook_name) == (1, 2, 1, 2, "L1H2",
                                                                          "L1H2")
    assert top.patching_effect == top.effect == effect and top.coords == (1, 2)
    assert [c.index for c in result.important(0.1, by="value")] == [(1, 2), (0, 3)]
    assert result.find_important_heads(0.3) == cells[:2]
    assert result.important(1.0) == []
    assert make((4,)).important(-1)[0].index in range(4)  # 1-D: bare layer indices
    with pytest.raises(InvalidArgumentError, match="head axis"):
        make((4,)).find_important_heads()
    with pytest.raises(InvalidTypeError):
        result.important("0.1")
    import pickle

    assert pickle.loads(pickle.dumps(top)).name == "L1H2"


def test_important_on_positions_reports_token_positions():
    result = make((3, 2, 4), axes=("layer", "position", "head"))
    cell = result.important(0)[0]
    assert cell.position in (1, 3) and cell.name == f"L{cell.layer}P{cell.position}H{cell.head}"


def ioi_roles_result(agree: bool = True) -> PatchingResult:
    result = make((2, 3), axes=("layer", "position"), n_pairs=2)
    result.extra["positions"] = [1, 3, 5]
    roles = ["", "IO", "", "S1", "", "END"]
    other = ["", "S1", "", "IO", "", "END"] if not agree else roles
    result.extra["position_roles"] = [roles, other]
    result.extra["answer_text"] = [[" Mary", " John"], [" Anne", None]]
    return result


def test_position_roles_label_the_axis_when_every_pair_agrees():
    result = ioi_roles_result()
    assert result.position_roles() == ["IO", "S1", "END"]
    assert [result.cell_text("position", i) for i in range(3)] == ["1: IO", "3: S1", "5: END"]
    assert "position 1: IO" in result.describe_cell((0, 0))
    assert result.labels["position"][0] == "1: 'When'"  # the data keeps pair 0's tokens
    fig = result.plot()
    assert fig.axes[0].get_xlabel() == "position (role)"
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["1: IO", "3: S1", "5: END"]
    assert PatchingResult.from_json(result.to_json()).position_roles() == ["IO", "S1", "END"]

    mixed = ioi_roles_result(agree=False)  # ABBA and BABA pairs: IO and S1 swap places
    assert mixed.position_roles() is None
    assert mixed.cell_text("position", 0) == "1: 'When'"
    assert mixed.plot().axes[0].get_xlabel() == "position (tokens of pair 0)"
    lone = make((2, 3), axes=("layer", "position"))
    assert lone.plot().axes[0].get_xlabel() == "position (token)"


def test_answer_texts_come_from_the_metadata():
    result = ioi_roles_result()
    assert result.answer_texts() == [(" Mary", " John"), (" Anne", None)]
    assert "correct ' Mary', incorrect ' John'" in result.summary()
    assert make((3,)).answer_texts() is None


def test_takeaway_names_the_strongest_cells_with_numbers():
    result = make((3, 4), n_pairs=3)
    result.per_pair.zero_()
    result.per_pair[:, 1, 2] = torch.tensor([0.5, 0.4, 0.36])
    result.per_pair[:, 2, 0] = torch.tensor([-0.3, -0.2, 0.05])
    result.effect_matrix = result.per_pair.mean(0)
    text = result.takeaway()
    assert text.startswith("Restoring attention heads from the clean run: layer 1 head 2 "
                           "recovers 42% of the clean-corrupted logit difference gap")
    assert "positive in 3 of 3 pairs" in text and "layer 2 head 0 (-15%)" in text
    assert "2 of 12 cells reach |effect| ≥ 10%" in text
    result.direction = "noise"
    assert "Patching corrupted attention heads into the clean run" in result.takeaway()
    weak = make((3,))
    weak.effect_matrix = torch.tensor([0.01, -0.02, 0.03])
    assert "no single cell recovers 10% or more" in weak.takeaway()
    raw = make((3,))
    raw.normalized = False
    assert "logit difference of" in raw.takeaway()


def test_raw_results_rank_cells_by_their_change_from_the_unpatched_run(tiny_lm):
    from causalpatch import activation_patching

    clean = "When Mary and John went to the store, John gave a drink to"
    corrupted = "When Mary and John went to the store, Mary gave a drink to"
    kwargs = dict(component="resid_post", correct=" Mary", incorrect=" John", progress=False)
    raw = activation_patching(tiny_lm, clean, corrupted, normalize=False, **kwargs)
    effect = activation_patching(tiny_lm, clean, corrupted, **kwargs)
    assert raw.is_raw and not effect.is_raw
    assert raw.unpatched_metric == raw.corrupted_metric  # denoising patches into corrupted
    # a raw cell's change from the unpatched run is proportional to its normalised effect, so
    # both rankings name the same cells (the values returned stay raw)
    assert [c for c, _ in raw.top_cells(3)] == [c for c, _ in effect.top_cells(3)]
    for coords, value in raw.top_cells(3):
        assert value == float(raw.effect_matrix[coords])
    back = PatchingResult.from_json(raw.to_json())
    assert back.is_raw and back.top_cells(3) == raw.top_cells(3)


@pytest.mark.parametrize("direction,unpatched", [("denoise", 4.5), ("noise", 4.5)])
def test_raw_ranking_differs_from_ranking_the_raw_values(direction, unpatched):
    """Raw values far from 0: the largest raw value is the smallest change from the unpatched
    run, so ranking the raw values themselves would put the cells in the opposite order."""
    raw = make((3,))
    raw.effect_matrix = torch.tensor([5.0, 4.25, 1.0])  # changes +0.5, -0.25, -3.5
    raw.normalized, raw.direction, raw.extra["scale"] = False, direction, "raw"
    if direction == "denoise":
        raw.corrupted_metric = unpatched
    else:
        raw.clean_metric = unpatched
    assert raw.unpatched_metric == unpatched
    assert raw.top_cells(3) == [((2,), 1.0), ((0,), 5.0), ((1,), 4.25)]
    assert raw.top_cells(3, by="value") == [((0,), 5.0), ((1,), 4.25), ((2,), 1.0)]
    assert raw.top_components(1) == [(raw.labels["layer"][2], 1.0)]
