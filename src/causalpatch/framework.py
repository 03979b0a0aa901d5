"""The TransformerLens-style patching framework's API, as thin calls of causalpatch's methods.

Code written for the small TransformerLens framework (``ActivationPatcher``, ``HeadPatcher``,
``summarize_results``, ``print_head_results``, ``create_head_heatmap``, ``create_full_report``)
runs here with only its imports and model loading changed::

    from causalpatch import ActivationPatcher, HeadPatcher, InterpretableModel
    from causalpatch import summarize_results, print_head_results, create_head_heatmap
    from causalpatch.datasets import IOIDataset

    model = InterpretableModel("smollm2")
    dataset = IOIDataset(model, n=8)
    layer_results = ActivationPatcher(model).run_patching_experiment(
        dataset=dataset, hook_points=[f"blocks.{l}.hook_attn_out" for l in range(30)])
    summarize_results(layer_results, top_k=5)
    head_results = HeadPatcher(model).run_all_heads_experiment(dataset=dataset)
    print_head_results(head_results, top_k=10)

Nothing here computes on its own: every experiment is one call of
:func:`causalpatch.activation_patching` (the exact fast engine; hook names such as
``blocks.5.hook_attn_out`` are spellings of canonical sites, :mod:`causalpatch.names`), and
every result is a :class:`~causalpatch.result.PatchingResult`. Two differences from the
framework it mirrors, both documented in ``docs/porting.md``: an effect is the mean patched
metric over pairs normalised by the mean clean-corrupted gap (not the mean of per-pair
ratios), and a TransformerLens ``hook_z`` hook point in ``run_patching_experiment`` is the
whole layer's ``z`` (every head at once), as patching the hook would be.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .datasets import PatchingDataset, as_patching_dataset
from .errors import InvalidArgumentError, InvalidTypeError
from .methods.activation_patching import CausalTrace, activation_patching
from .names import Site
from .result import ImportantCell, PatchingResult, write_report

#: ``patch_type`` of :meth:`HeadPatcher.run_all_heads_experiment` -> sweep component.
PATCH_TYPES = {"output": "attn_head", "z": "attn_head", "query": "attn_head_q",
               "key": "attn_head_k", "value": "attn_head_v"}


class ActivationPatcher:
    """Patch whole hook points (a layer's attention output, MLP output, residual stream).

    Args:
        model: an :class:`~causalpatch.InterpretableModel` (or ``HookedModel``).
    """

    def __init__(self, model: Any) -> None:
        _check_model(model, "ActivationPatcher")
        self.model = model

    def run_patching_experiment(self, dataset: Any, hook_points: Sequence[str],
                                pair_indices: Sequence[int] | None = None,
                                position: int | None = None, **kwargs: Any) -> PatchingResult:
        """Patch each hook point from the clean run into the corrupted run, one at a time.

        Args:
            dataset: a :class:`~causalpatch.datasets.PatchingDataset` (e.g. ``IOIDataset``) or
                any object with ``get_clean_corrupt_pairs`` / ``get_target_tokens``.
            hook_points: names of one kind at several layers, in any spelling
                (``blocks.{l}.hook_attn_out``, ``blocks.{l}.attn``, ``layers.{l}.mlp``), or
                names of different kinds (then one cell per name).
            pair_indices: use only these pairs (default all).
            position: patch only this token position (default all positions).
            kwargs: passed to :func:`causalpatch.activation_patching` (``metric``,
                ``direction``, ``batch_size``, ...).

        Returns:
            A :class:`PatchingResult`: axis ``layer`` (shape ``[len(hook_points)]``) when every
            hook point is the same kind at a different layer, else axis ``site`` with one cell
            per hook point (labels: the names as given).

        Raises:
            InvalidArgumentError: no hook points, a repeated one, or an unknown name (before
                any forward pass).
        """
        names = _names(hook_points, "hook_points")
        sites = [self.model.site(n) for n in names]
        data = _subset(dataset, pair_indices, self.model)
        positions = None if position is None else [position]
        kind = _common_kind(sites)
        if kind is not None:
            return activation_patching(self.model, data, component=kind,
                                       layers=[s.layer for s in sites], positions=positions,
                                       **kwargs)
        return _one_cell_per_site(self.model, data, names, positions, **kwargs)

    def get_all_hook_points(self, pattern: str | None = None) -> list[str]:
        """Every canonical component name (containing ``pattern`` when given)."""
        return [n for n in self.model.component_names() if pattern is None or pattern in n]


class HeadPatcher:
    """Patch one attention head at a time (its output ``z`` before the output projection).

    Args:
        model: an :class:`~causalpatch.InterpretableModel` (or ``HookedModel``).
    """

    def __init__(self, model: Any) -> None:
        _check_model(model, "HeadPatcher")
        self.model = model
        self.n_layers, self.n_heads = model.n_layers, model.n_heads

    def run_all_heads_experiment(self, dataset: Any, pair_indices: Sequence[int] | None = None,
                                 position: int | None = None, patch_type: str = "output",
                                 **kwargs: Any) -> PatchingResult:
        """Every head of every layer, patched alone: ``effect_matrix [n_layers, n_heads]``.

        Args:
            dataset: as in :meth:`ActivationPatcher.run_patching_experiment`.
            pair_indices: use only these pairs (default all).
            position: patch only this token position (default all).
            patch_type: ``"output"`` (each head's ``z``), or ``"query"`` / ``"key"`` /
                ``"value"`` (its queries, keys or values). Attention patterns are read-only
                here: patch ``"query"`` or ``"key"`` instead.
            kwargs: passed to :func:`causalpatch.activation_patching` (``layers``, ``heads``,
                ``metric``, ``direction`` ...).
        """
        if patch_type not in PATCH_TYPES:
            hint = (" Attention patterns cannot be written; patching a head's queries or keys "
                    "(patch_type='query' / 'key') changes its pattern." if patch_type == "pattern"
                    else "")
            raise InvalidArgumentError(
                f"patch_type must be one of {', '.join(map(repr, PATCH_TYPES))}, got "
                f"{patch_type!r}.{hint}")
        data = _subset(dataset, pair_indices, self.model)
        return activation_patching(self.model, data, component=PATCH_TYPES[patch_type],
                                   positions=None if position is None else [position], **kwargs)

    def find_important_heads(self, results: PatchingResult, threshold: float = 0.1
                             ) -> list[ImportantCell]:
        """See :func:`find_important_heads`."""
        return find_important_heads(results, threshold)

    def results_to_heatmap(self, results: PatchingResult) -> Any:
        """The effects ``[n_layers, n_heads]`` (a tensor)."""
        _check_result(results, "results_to_heatmap", ("layer", "head"))
        return results.effect_matrix


def find_important_heads(results: PatchingResult, threshold: float = 0.1
                         ) -> list[ImportantCell]:
    """Heads with ``|effect| >= threshold``, largest first: ``ImportantCell``s with ``.layer``,
    ``.head``, ``.patching_effect`` and ``.hook_name`` (``"L9H3"``); see
    :meth:`PatchingResult.find_important_heads`."""
    _check_result(results, "find_important_heads")
    return results.find_important_heads(threshold)


def summarize_results(results: PatchingResult, top_k: int = 10) -> None:
    """Print the ``top_k`` cells by ``|effect|`` with a bar each, largest first."""
    _check_result(results, "summarize_results")
    _print_top(results, top_k, f"TOP {top_k} PATCHING RESULTS (effect: 1 = full recovery)", 20)


def print_head_results(results: PatchingResult, top_k: int = 20) -> None:
    """Print the ``top_k`` heads by ``|effect|`` (``L9H3  +0.420  ████``)."""
    _check_result(results, "print_head_results", ("layer", "head"))
    _print_top(results, top_k, f"TOP {top_k} ATTENTION HEADS BY PATCHING EFFECT", 30)


def create_head_heatmap(results: PatchingResult, n_layers: int | None = None,
                        n_heads: int | None = None, title: str | None = None) -> Any:
    """The layer x head heatmap of a head result (:meth:`PatchingResult.plot`): a matplotlib
    figure with ``.show()`` and ``.save(path)``. ``n_layers``/``n_heads``, when given, must
    match the result."""
    _check_result(results, "create_head_heatmap", ("layer", "head"))
    _check_size(results, n_layers, n_heads, "create_head_heatmap")
    return results.plot(title=title)


def create_full_report(head_results: PatchingResult | None = None,
                       layer_results: PatchingResult | None = None,
                       n_layers: int | None = None, n_heads: int | None = None,
                       save_dir: str | os.PathLike[str] = "./figures") -> dict[str, Path]:
    """Write every figure and one HTML report into ``save_dir`` (created if missing).

    Writes ``head_heatmap.png`` (``head_results``), ``layer_effects.png`` (``layer_results``),
    each result's JSON, and ``report.html`` (both results, :func:`causalpatch.write_report`).

    Returns:
        ``{what: path}`` of the files written.
    """
    given = [(n, r) for n, r in (("head", head_results), ("layer", layer_results))
             if r is not None]
    if not given:
        raise InvalidArgumentError(
            "create_full_report needs head_results= and/or layer_results= (PatchingResult)")
    for name, result in given:
        _check_result(result, f"create_full_report({name}_results=)")
    if head_results is not None:
        _check_result(head_results, "create_full_report(head_results=)", ("layer", "head"))
        _check_size(head_results, n_layers, n_heads, "create_full_report")
    folder = Path(save_dir)
    folder.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for name, result in given:
        figure = "head_heatmap" if name == "head" else "layer_effects"
        written[figure] = result.save(folder / f"{figure}.png")
        written[f"{name}_json"] = result.save(folder / f"{name}_results.json")
    write_report([r for _, r in given], folder / "report.html",
                 title="causalpatch: patching report")
    written["report"] = folder / "report.html"
    return written


# -- helpers -----------------------------------------------------------------------------------
def _check_model(model: Any, what: str) -> None:
    if not (hasattr(model, "site") and hasattr(model, "n_layers")):
        raise InvalidTypeError(
            f"{what}(model) takes a causalpatch model, got {type(model).__name__}; load one with "
            "causalpatch.InterpretableModel(name_or_path)")


def _check_result(results: Any, what: str, axes: tuple[str, ...] | None = None) -> None:
    if not isinstance(results, PatchingResult):
        raise InvalidTypeError(
            f"{what} takes a PatchingResult (what run_patching_experiment / "
            f"run_all_heads_experiment return), got {type(results).__name__}")
    if axes is not None and results.axes != axes:
        raise InvalidArgumentError(
            f"{what} needs a result with axes {axes} (HeadPatcher.run_all_heads_experiment), "
            f"got {results.axes}")


def _check_size(results: PatchingResult, n_layers: int | None, n_heads: int | None,
                what: str) -> None:
    for name, given, actual in (("n_layers", n_layers, results.shape[0]),
                                ("n_heads", n_heads, results.shape[1])):
        if given is not None and given != actual:
            raise InvalidArgumentError(
                f"{what}: {name}={given} but the result has {actual}; pass {name}={actual} or "
                "leave it out")


def _names(hook_points: Any, what: str) -> list[str]:
    if isinstance(hook_points, str):
        hook_points = [hook_points]
    names = list(hook_points)
    if not names:
        raise InvalidArgumentError(f"{what} is empty: give at least one name")
    for n in names:
        if not isinstance(n, str):
            raise InvalidTypeError(f"{what} must hold names (strings), got {n!r}")
    if len(set(names)) != len(names):
        raise InvalidArgumentError(f"{what} has repeated names: {names}")
    return names


def _common_kind(sites: list[Site]) -> str | None:
    """The per-layer kind every site shares, each at its own layer, or ``None``. Per-head kinds
    are excluded: a hook point means the whole layer's value (every head at once)."""
    kinds = {s.kind for s in sites}
    layers = [s.layer for s in sites]
    if len(kinds) != 1 or None in layers or len(set(layers)) != len(layers):
        return None
    (kind,) = kinds
    if kind == "module" or sites[0].per_head or sites[0].name != f"blocks.{layers[0]}.{kind}":
        return None
    return kind


def _subset(dataset: Any, pair_indices: Sequence[int] | None, model: Any) -> Any:
    """The dataset as a causalpatch dataset, restricted to ``pair_indices``."""
    data = as_patching_dataset(dataset, model)
    if pair_indices is None:
        return data
    if not isinstance(data, PatchingDataset):
        raise InvalidArgumentError(
            f"pair_indices needs a dataset, got {type(dataset).__name__}")
    picked = list(pair_indices)
    n = len(data.clean)
    bad = [i for i in picked if not isinstance(i, int) or not -n <= i < n]
    if bad or not picked:
        raise InvalidArgumentError(
            f"pair_indices must be a non-empty list of indices in [0, {n - 1}], got {picked}")
    rows = [(data.clean[i], data.corrupted[i], data.correct[i], data.incorrect[i])
            for i in picked]
    return PatchingDataset.from_pairs(model, rows, metric=data.metric)


def _one_cell_per_site(model: Any, data: Any, names: list[str], positions: list[int] | None,
                       **kwargs: Any) -> PatchingResult:
    """Hook points of different kinds: one :class:`CausalTrace` cell per name, gathered into
    one result with a ``site`` axis (each cell exactly the sweep's value for that site)."""
    direction = kwargs.pop("direction", "denoise")
    metric = kwargs.pop("metric", None)
    if kwargs:
        raise InvalidArgumentError(
            f"run_patching_experiment over hook points of different kinds takes metric= and "
            f"direction= only, got {sorted(kwargs)}; patch one kind per call for the rest")
    cells = []
    for name in names:
        with CausalTrace(model, data, direction=direction) as ct:
            ct.patch(name, positions=positions)
            cells.append(ct.result(metric))
    first = cells[0]
    return PatchingResult(
        effect_matrix=torch.cat([c.effect_matrix for c in cells]),
        axes=("site",), labels={"site": list(names)}, component="hook_points",
        metric=first.metric, method="activation_patching", model_name=first.model_name,
        direction=first.direction, clean_prompts=first.clean_prompts,
        corrupted_prompts=first.corrupted_prompts, clean_metric=first.clean_metric,
        corrupted_metric=first.corrupted_metric,
        per_pair=None if any(c.per_pair is None for c in cells)
        else torch.cat([c.per_pair for c in cells if c.per_pair is not None], 1),
        extra={**first.extra, "patches": [c.extra.get("patches", [None])[0] for c in cells]})


def _print_top(results: PatchingResult, top_k: int, heading: str, bar_width: int) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise InvalidArgumentError(f"top_k must be a positive int, got {top_k!r}")
    rule = "=" * 60
    print(f"\n{rule}\n{heading}\n{rule}")
    print(f"{results.metric}, {results.direction}, {results.n_pairs} pair(s)\n")
    for coords, effect in results.top_cells(top_k):
        label = _cell_name(results, coords)
        bar = "█" * min(bar_width, int(abs(effect) * bar_width))
        print(f"{label:<40s} | {effect:+.3f} | {bar}")


def _cell_name(results: PatchingResult, coords: tuple[int, ...]) -> str:
    values = {a: results.index_value(a, c) for a, c in zip(results.axes, coords)}
    if results.axes == ("layer", "head"):
        return f"L{values['layer']}H{values['head']}"
    if results.axes == ("layer",):
        return f"blocks.{values['layer']}.{results.component}"
    return results.describe_cell(coords)
