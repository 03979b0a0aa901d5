"""Attention patterns over a prompt's tokens: one heatmap per chosen head (query rows, key
columns, the token strings as tick labels), weights 0..1 on a sequential colour scale.

Duck-typed on the model: anything with ``attention_pattern(prompt, layer, heads)``
(``[head, query, key]``), ``to_str_tokens(prompt)`` and ``n_heads`` can be drawn
(:class:`causalpatch.HookedModel` has them). matplotlib is imported inside the function.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .plots import COLUMN_WIDTH, FONT_SIZE, TEXT_WIDTH

#: Sequential colour map for weights in [0, 1].
PATTERN_CMAP = "Blues"


def plot_attention_pattern(model: Any, prompt: Any, layer: int,
                           heads: int | Sequence[int] | None = None, *,
                           max_columns: int = 4) -> Any:
    """A figure of layer ``layer``'s attention pattern on ``prompt`` for ``heads`` (all by
    default): one panel per head, rows the query tokens, columns the key tokens.

    Returns:
        a :class:`~causalpatch.render.figure.ResultFigure` (a matplotlib ``Figure`` with
        ``show()`` and ``save(path)``).
    """
    from .figure import ResultFigure

    chosen = list(range(model.n_heads)) if heads is None else (
        [heads] if isinstance(heads, int) else list(heads))
    pattern = model.attention_pattern(prompt, layer, chosen).detach().float().cpu().numpy()
    tokens = [repr(t)[1:-1] for t in model.to_str_tokens(prompt)]
    n = len(chosen)
    cols = max(1, min(n, max_columns))
    rows = (n + cols - 1) // cols
    width = COLUMN_WIDTH if cols == 1 else TEXT_WIDTH
    side = width / cols
    fig = ResultFigure(figsize=(width, side * rows + 0.4))
    axes = fig.subplots(rows, cols, squeeze=False)
    image = None
    for k, head in enumerate(chosen):
        ax = axes[k // cols][k % cols]
        image = ax.imshow(pattern[k], cmap=PATTERN_CMAP, vmin=0.0, vmax=1.0,
                          interpolation="nearest")
        ax.set_title(f"L{layer}H{head}", fontsize=FONT_SIZE + 1)
        ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=FONT_SIZE)
        ax.set_yticks(range(len(tokens)), tokens, fontsize=FONT_SIZE)
        ax.set_xlabel("key", fontsize=FONT_SIZE + 1)
        if k % cols == 0:
            ax.set_ylabel("query", fontsize=FONT_SIZE + 1)
    for k in range(n, rows * cols):
        axes[k // cols][k % cols].set_axis_off()
    if image is not None:
        fig.colorbar(image, ax=[a for row in axes for a in row], shrink=0.8,
                     label="attention weight")
    return fig
