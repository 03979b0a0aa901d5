"""A causal-tracing result saves and shows itself like every other result: HTML report, JSON of
every component, ROME-style figures, a notebook view."""

from __future__ import annotations

import json

import pytest

from causalpatch.errors import InvalidArgumentError
from causalpatch.methods.causal_tracing import causal_tracing
from causalpatch.result import PatchingResult

PROMPT = "The Eiffel Tower is in the city of"


@pytest.fixture(scope="module")
def traced(make_tiny_lm):
    model = make_tiny_lm("llama")
    return causal_tracing(model, PROMPT, " Eiffel Tower", samples=2, window=2,
                          position_groups=False, progress=False)


def test_html_report_has_every_component(traced, tmp_path):
    html = traced.to_html(tmp_path / "trace.html")
    assert (tmp_path / "trace.html").read_text(encoding="utf-8") == html
    for kind in traced:
        assert kind in html
    assert traced.save(tmp_path / "t.htm").exists()


def test_json_holds_every_component_exactly(traced, tmp_path):
    traced.save(tmp_path / "trace.json")
    data = json.loads((tmp_path / "trace.json").read_text(encoding="utf-8"))
    assert sorted(data) == sorted(traced)
    for kind, result in traced.items():
        back = PatchingResult.from_json(json.dumps(data[kind]))
        assert back.effect_matrix.tolist() == result.effect_matrix.tolist()


@pytest.mark.parametrize("suffix", ["png", "svg"])
def test_figures_and_notebook_view(traced, tmp_path, suffix):
    path = traced.save(tmp_path / f"trace.{suffix}")
    assert path.stat().st_size > 1000
    view = traced._repr_html_()
    assert view.count("<table") >= len(traced)


def test_unknown_format_is_refused(traced, tmp_path):
    with pytest.raises(InvalidArgumentError, match="cannot save a causal-tracing result"):
        traced.save(tmp_path / "trace.xlsx")
    assert not (tmp_path / "trace.xlsx").exists()
