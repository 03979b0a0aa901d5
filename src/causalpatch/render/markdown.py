"""Markdown tables of results: a metadata header and the effect table.

:func:`to_markdown` is what ``PatchingResult.to_markdown`` returns. Results are duck-typed:
anything with ``effect_matrix``, ``std``, ``axes``, ``shape``, ``n_pairs``, the metadata
fields (``method``, ``component``, ``metric``, ``direction``, ``model_name``, ``normalized``,
``clean_metric``, ``corrupted_metric``, ``clean_prompts``, ``corrupted_prompts``, ``timings``)
and ``cell_text(axis, i)`` can be rendered.

Every piece of user text is shown literally: :func:`md_text` neutralises inline HTML and
Markdown emphasis, :func:`md_code` makes a code span that no backtick in the text can close.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from ..result import PatchingResult

_MD_SPECIAL = str.maketrans({c: "\\" + c for c in "\\`*_[]|#"})


def timing_name(name: str) -> str:
    """Display name of a timing key: ``"run_s"`` -> ``"run"``."""
    return name[:-2] if name.endswith("_s") else name


def md_text(value: Any) -> str:
    """Text shown literally in Markdown (inline HTML and emphasis neutralised)."""
    text = " ".join(str(value).split("\n"))
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return text.translate(_MD_SPECIAL)


def md_code(value: Any) -> str:
    """A Markdown code span holding ``value`` verbatim (on one line)."""
    text = " ".join(str(value).split("\n"))
    run, longest = 0, 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") or not text else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def md_table(head: list[str], rows: list[list[str]], max_rows: int, max_cols: int) -> list[str]:
    """A Markdown table (first column left-aligned, the others right-aligned), as lines.

    Cells are escaped with :func:`md_text`. Rows beyond ``max_rows`` and columns beyond
    ``max_cols`` are left out, with a note saying how many.
    """
    n_cols = len(head)
    cut_cols = n_cols > max_cols
    head = head[:max_cols]
    lines = ["| " + " | ".join(md_text(h) for h in head) + " |",
             "|---|" + "---:|" * (len(head) - 1)]
    for row in rows[:max_rows]:
        lines.append("| " + " | ".join(md_text(c) for c in row[:max_cols]) + " |")
    notes = []
    if len(rows) > max_rows:
        notes.append(f"{len(rows) - max_rows} more rows")
    if cut_cols:
        notes.append(f"{n_cols - max_cols} more columns")
    if notes:
        lines += ["", f"*({' and '.join(notes)} not shown; see to_dataframe())*"]
    return lines


def md_grid(result: PatchingResult, mat: torch.Tensor, row_axis: str, col_axis: str, fmt: str,
            max_rows: int, max_cols: int) -> list[str]:
    """A 2-D Markdown table of ``mat``: rows ``row_axis``, columns ``col_axis`` of ``result``."""
    head = [f"{row_axis} \\ {col_axis}"] + [
        result.cell_text(col_axis, j) for j in range(mat.shape[1])]
    rows = [[result.cell_text(row_axis, i)] + [fmt.format(v) for v in values]
            for i, values in enumerate(mat.tolist())]
    return md_table(head, rows, max_rows, max_cols + 1)


def to_markdown(result: PatchingResult, max_rows: int = 100, max_cols: int = 40,
                digits: int = 3) -> str:
    """Markdown: a metadata header and the effect table.

    1-D results: one row per entry (with a ``std`` column when present). 2-D results:
    rows are the first axis, columns the second. 3-D results: one table per entry of the
    middle axis (e.g. per position: layers x heads). More axes: rows are the combinations
    of all axes but the last.

    Args:
        result: the result (a ``PatchingResult`` or anything shaped like one).
        max_rows: rows per table; the rest is left out with a note.
        max_cols: columns per table; the rest is left out with a note.
        digits: decimals of each effect.
    """
    kind = ("normalised: (patched - base) / (source - base)" if result.normalized
            else "raw values")
    lines = [f"### {md_text(result.method)}: {md_code(result.component)} "
             f"({md_text(result.metric)}, {md_text(result.direction)})", ""]
    if result.model_name:
        lines.append(f"- **model**: {md_code(result.model_name)}")
    lines.append(f"- **metric**: {md_text(result.metric)} ({kind})")
    from .text import run_words, title_words, value_heading

    lines.append(f"- **what**: {md_text(title_words(result))}")
    lines += [f"- {md_text(words)}" for words in run_words(result)]  # the method's settings
    baselines = []
    if result.clean_metric is not None:
        baselines.append(f"clean {result.clean_metric:.4f}")
    if result.corrupted_metric is not None:
        baselines.append(f"corrupted {result.corrupted_metric:.4f}")
    if baselines:
        lines.append("- **baselines**: " + "; ".join(baselines))
    lines.append(f"- **shape**: {' x '.join(map(str, result.shape))} "
                 f"({' x '.join(md_text(a) for a in result.axes)}); pairs: {result.n_pairs}")
    if result.clean_prompts:
        more = len(result.clean_prompts) - 1
        lines.append(f"- **clean prompt**: {md_code(result.clean_prompts[0])}"
                     + (f" (and {more} more)" if more else ""))
    if result.corrupted_prompts:
        lines.append(f"- **corrupted prompt**: {md_code(result.corrupted_prompts[0])}")
    answers = getattr(result, "answer_texts", None)
    answers = answers() if callable(answers) else None
    if answers:
        correct, incorrect = answers[0]
        shown = [f"{md_code(repr(correct))} (correct)" if correct is not None else "",
                 f"{md_code(repr(incorrect))} (incorrect)" if incorrect is not None else ""]
        lines.append("- **answers** (pair 0): " + " vs ".join(t for t in shown if t))
    if "position" in result.axes:
        from .text import axis_title

        lines.append(f"- **position labels**: {md_text(axis_title(result, 'position'))}")
    if result.timings:
        lines.append("- **time**: " + ", ".join(
            f"{md_text(timing_name(k))} {v:.2f} s" for k, v in result.timings.items()))
    lines += [""]
    fmt = f"{{:+.{digits}f}}"
    m = result.effect_matrix
    axes = result.axes
    if m.dim() == 1:
        axis = axes[0]
        std = None if result.std is None else result.std.tolist()
        rows = [[result.cell_text(axis, i), fmt.format(v)]
                + ([f"{std[i]:.{digits}f}"] if std is not None else [])
                for i, v in enumerate(m.tolist())]
        lines += md_table([axis, value_heading(result)] + (["std"] if std is not None else []),
                          rows,
                          max_rows, max_cols + 1)
    elif m.dim() == 2:
        lines += md_grid(result, m, axes[0], axes[1], fmt, max_rows, max_cols)
    elif m.dim() == 3:
        mid = axes[1]
        for j in range(m.shape[1]):
            lines += [f"**{md_text(mid)} {md_text(result.cell_text(mid, j))}**", ""]
            lines += md_grid(result, m[:, j], axes[0], axes[2], fmt, max_rows, max_cols)
            lines.append("")
    else:
        last = axes[-1]
        head = [" / ".join(axes[:-1]) + " \\ " + last] + [
            result.cell_text(last, j) for j in range(m.shape[-1])]
        rows = []
        flat = m.reshape(-1, m.shape[-1]).tolist()
        for coords, values in zip(itertools.product(*map(range, result.shape[:-1])), flat):
            name = ", ".join(f"{a} {result.cell_text(a, c)}"
                             for a, c in zip(axes[:-1], coords))
            rows.append([name] + [fmt.format(v) for v in values])
        lines += md_table(head, rows, max_rows, max_cols + 1)
    return "\n".join(lines).rstrip("\n") + "\n"


__all__ = ["md_code", "md_grid", "md_table", "md_text", "timing_name", "to_markdown"]
