"""PatchingResult: serialisation round trips, rejection of damaged files, exports and plots."""

from __future__ import annotations

import json

import matplotlib
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from causalpatch.errors import CorruptResultError, InvalidArgumentError
from causalpatch.result import PatchingResult

matplotlib.use("Agg")


def make(shape: tuple[int, ...], seed: int = 0, with_std: bool = False) -> PatchingResult:
    axes = ("layer", "position", "head")[: len(shape)] if len(shape) != 2 else ("layer", "head")
    labels: dict = {"layer": list(range(shape[0]))}
    if "position" in axes:
        labels["position"] = [f"{i}: 'tok{i}'" for i in range(shape[1])]
    if "head" in axes:
        labels["head"] = list(range(shape[-1]))
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(*shape, generator=g)
    return PatchingResult(
        effect_matrix=m, axes=axes, labels=labels, component="attn_head", metric="logit_diff",
        model_name="tiny", clean_prompts=["a b"], corrupted_prompts=["a c"],
        clean_tokens=[["a", " b"]], clean_metric=2.0, corrupted_metric=-1.0,
        std=m.abs() / 10 if with_std else None,
        extra={"positions": list(range(shape[1])) if "position" in axes else None})


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 5), min_size=1, max_size=3), st.integers(0, 1000), st.booleans())
def test_json_round_trip_is_exact(shape, seed, with_std):
    result = make(tuple(shape), seed, with_std)
    back = PatchingResult.from_json(result.to_json())
    assert torch.equal(back.effect_matrix, result.effect_matrix)
    assert back.labels == result.labels and back.axes == result.axes
    assert (back.std is None) == (result.std is None)
    assert back.to_dict() == result.to_dict()


def test_save_and_load_file(tmp_path):
    result = make((3, 4))
    path = tmp_path / "r.json"
    result.save(path)
    assert torch.equal(PatchingResult.from_json(path).effect_matrix, result.effect_matrix)
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temp files left


def test_truncated_file_is_rejected(tmp_path):
    text = make((3, 4)).to_json()
    path = tmp_path / "r.json"
    path.write_text(text[: len(text) // 2])
    with pytest.raises(CorruptResultError, match="not valid JSON"):
        PatchingResult.from_json(path)


def test_hand_edited_value_is_rejected():
    doc = json.loads(make((3, 4)).to_json())
    doc["result"]["effect_matrix"][0][0] = 123.0
    with pytest.raises(CorruptResultError, match="checksum"):
        PatchingResult.from_json(json.dumps(doc))


def test_nan_and_wrong_shapes_are_rejected():
    text = make((3, 4)).to_json().replace('"clean_metric": 2.0', '"clean_metric": NaN')
    with pytest.raises(CorruptResultError):
        PatchingResult.from_json(text)
    payload = make((3, 4)).to_dict()
    payload["labels"]["layer"] = [0, 1]
    with pytest.raises(CorruptResultError):
        PatchingResult.from_dict(payload)
    with pytest.raises(CorruptResultError, match="not a causalpatch result"):
        PatchingResult.from_json('{"format": "other"}')


def test_top_components_orders_by_magnitude_and_uses_labels():
    m = torch.tensor([[0.1, -0.9], [0.5, 0.2]])
    result = PatchingResult(m, ("layer", "head"), {"layer": [10, 11], "head": [0, 1]},
                            "attn_head", "logit_diff")
    assert result.top_components(2) == [((10, 1), pytest.approx(-0.9)),
                                         ((11, 0), pytest.approx(0.5))]
    assert result.top_components(1, by="value")[0][0] == (11, 0)
    per_layer = PatchingResult(torch.tensor([0.1, 0.7]), ("layer",), {"layer": [3, 4]}, "mlp",
                               "l2")
    assert per_layer.top_components(1)[0][0] == 4  # bare layer number for 1-D results


def test_markdown_has_the_table():
    result = make((2, 3))
    md = result.to_markdown()
    value = f"{result.effect_matrix[1, 2].item():+.3f}"
    assert "| layer \\ head |" in md and value in md


def test_dataframe_has_one_row_per_cell():
    result = make((2, 3, 4), with_std=True)
    df = result.to_dataframe()
    assert len(df) == 24
    assert {"layer", "position", "head", "effect", "std", "token"} <= set(df.columns)


@pytest.mark.parametrize("shape", [(5,), (4, 3), (3, 4, 2)])
def test_plot_is_a_figure_with_centred_colours(shape):
    from matplotlib.figure import Figure

    result = make(shape)
    fig = result.plot()
    assert isinstance(fig, Figure)
    if len(shape) > 1:
        image = fig.axes[0].images[0]
        low, high = image.get_clim()
        assert low == pytest.approx(-high)
    if len(shape) == 3:
        labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
        assert "0: 'tok0'" in labels


@pytest.mark.parametrize("suffix", [".png", ".svg", ".json", ".md", ".html"])
def test_save_by_suffix_leaves_no_temp_files(tmp_path, suffix):
    path = tmp_path / f"out{suffix}"
    make((3, 4)).save(path)
    assert path.stat().st_size > 0
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_save_unknown_suffix_is_a_clear_error(tmp_path):
    with pytest.raises(InvalidArgumentError, match=r"\.png"):
        make((3,)).save(tmp_path / "x.bmp")
