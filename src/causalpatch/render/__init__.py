"""Rendering of results: Markdown tables, matplotlib figures and the interactive HTML report.

* :mod:`~causalpatch.render.markdown`: :func:`to_markdown` (``PatchingResult.to_markdown``).
* :mod:`~causalpatch.render.plots`: :func:`plot_result` (``PatchingResult.plot``/``save``),
  figures sized for a paper column; :mod:`~causalpatch.render.figure`: ``ResultFigure`` with
  ``show()`` and ``save(path)`` (png/svg/pdf).
* :mod:`~causalpatch.render.html`: :func:`report`, one HTML file for one or several results
  (``PatchingResult.to_html``; ``causalpatch.result.write_report`` for saved JSON files), and
  :func:`compact_html` (``_repr_html_``).
* :mod:`~causalpatch.render.attention`: :func:`plot_attention_pattern`, chosen heads'
  attention patterns over a prompt's tokens (``blocks.L.attn.pattern``).
* :mod:`~causalpatch.render.text`: components and metrics in words, axis titles, each
  method's title (``title_words``: path patching's senders -> receivers, the ablation kind,
  attribution's estimates, causal tracing's restored state), settings (``run_words``),
  baselines, :func:`takeaway` (``PatchingResult.takeaway``) and its one-line ``headline``
  (the report summary's line).
* :mod:`~causalpatch.render.lens`: logit-lens and direct-logit-attribution figures, HTML views
  and their report sections (title and headline).
* :mod:`~causalpatch.render.circuit`: the report sections of edge attribution and circuits:
  the circuit drawn by layer (edges weighted and signed, a control for how many), a sortable
  edge table, the faithfulness curve, a circuit evaluation's numbers.

Everything here is duck-typed on results and never imports ``causalpatch.result`` (which sits
above it and delegates its rendering here). matplotlib and plotly are imported only when a
figure or report is made, so importing this package has no side effects.
"""

from .attention import plot_attention_pattern
from .html import (
    PLOTLY_MODES,
    compact_html,
    figure_spec,
    is_result,
    library_versions,
    report,
    script_json,
)
from .markdown import to_markdown
from .plots import plot_result
from .text import component_words, takeaway

__all__ = ["PLOTLY_MODES", "compact_html", "component_words", "figure_spec", "is_result",
           "library_versions", "plot_attention_pattern", "plot_result", "report", "script_json",
           "takeaway", "to_markdown"]
