"""Rendering of results: Markdown tables, matplotlib figures and the interactive HTML report.

* :mod:`~causalpatch.render.markdown`: :func:`to_markdown` (``PatchingResult.to_markdown``).
* :mod:`~causalpatch.render.plots`: :func:`plot_result` (``PatchingResult.plot``/``save``).
* :mod:`~causalpatch.render.html`: :func:`report`, one self-contained HTML file for one or
  several results (``PatchingResult.to_html``), and :func:`compact_html` (``_repr_html_``).

Everything here is duck-typed on results and never imports ``causalpatch.result`` (which sits
above it and delegates its rendering here). matplotlib and plotly are imported only when a
figure or report is made, so importing this package has no side effects.
"""

from .html import compact_html, figure_spec, is_result, library_versions, report, script_json
from .markdown import to_markdown
from .plots import plot_result

__all__ = ["compact_html", "figure_spec", "is_result", "library_versions", "plot_result",
           "report", "script_json", "to_markdown"]
