"""``ResultFigure``: a matplotlib ``Figure`` whose ``show()`` works without pyplot.

:func:`causalpatch.render.plots.plot_result` builds figures with the object API, so making
one touches no pyplot state (nothing accumulates in pyplot's figure list in a long sweep). A
plain ``Figure`` made that way has no figure manager, and ``Figure.show()`` then raises
``AttributeError: Figure.show works only for figures managed by pyplot``. ``ResultFigure``
hands itself to pyplot on the first ``show()`` instead, so ``result.plot().show()`` works.

``ResultFigure.save(path)`` writes PNG, SVG or PDF (from the suffix or ``format=``)
atomically, cropped to the drawing.

This module imports matplotlib at import time; import it lazily (inside functions).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from matplotlib.figure import Figure

from .._io import atomic_write_bytes
from ..errors import InvalidArgumentError

FIGURE_FORMATS = ("png", "svg", "pdf")
"""Formats :meth:`ResultFigure.save` writes."""


class ResultFigure(Figure):
    """A ``Figure`` that registers itself with pyplot when it is first shown.

    Everything else is plain ``matplotlib.figure.Figure`` (``savefig``, ``axes``, notebook
    display, pickling). ``show()`` uses pyplot's current backend: a window with a GUI
    backend (as ``Figure.show`` does, it does not run an event loop; in a script call
    ``matplotlib.pyplot.show()`` afterwards to keep the window open), nothing with a
    non-interactive one such as Agg.
    """

    def show(self, warn: bool = True) -> None:
        """Show the figure, handing it to pyplot first if pyplot does not manage it yet."""
        if self.canvas.manager is None:
            adopt_into_pyplot(self)
        super().show(warn=warn)

    def save(self, path: str | os.PathLike[str], format: str | None = None,
             dpi: int = 300) -> Path:
        """Write the figure to ``path`` atomically and return the path.

        Args:
            path: the file; its suffix (``.png``, ``.svg``, ``.pdf``) picks the format unless
                ``format`` is given.
            format: ``"png"``, ``"svg"`` or ``"pdf"`` (overrides the suffix).
            dpi: resolution of PNGs (300: print quality; vector formats ignore it).

        Raises:
            InvalidArgumentError: an unknown format or suffix.
            FileNotFoundError: the folder does not exist.
        """
        return save_figure(self, path, format, dpi)


def adopt_into_pyplot(fig: Figure) -> None:
    """Give ``fig`` (made with the object API) a pyplot figure manager of the current backend."""
    import matplotlib.pyplot as plt

    try:
        plt.figure(fig)  # matplotlib >= 3.10 adopts a figure pyplot did not create
    except ValueError:
        # matplotlib 3.7-3.9 raise "The passed figure is not managed by pyplot"; do what
        # pyplot.figure does in 3.10 (these pyplot internals exist in 3.7 to 3.11).
        num = max(plt.get_fignums(), default=0) + 1
        manager = plt._get_backend_mod().new_figure_manager_given_figure(num, fig)
        plt._pylab_helpers.Gcf._set_new_active_manager(manager)


def figure_format(path: str | os.PathLike[str], format: str | None = None) -> str:
    """``"png"``/``"svg"``/``"pdf"`` from ``format`` or the suffix of ``path``."""
    chosen = format if format is not None else Path(path).suffix.lower().lstrip(".")
    chosen = str(chosen).lower().lstrip(".")
    if chosen not in FIGURE_FORMATS:
        raise InvalidArgumentError(
            f"cannot save a figure as {chosen or '(no suffix)'!r} ({str(path)!r}); use one of "
            + ", ".join(FIGURE_FORMATS) + " (from the suffix or format=)")
    return chosen


def save_figure(fig: Figure, path: str | os.PathLike[str], format: str | None = None,
                dpi: int = 300) -> Path:
    """Save any matplotlib figure like :meth:`ResultFigure.save`."""
    chosen = figure_format(path, format)
    buffer = io.BytesIO()
    fig.savefig(buffer, format=chosen, dpi=dpi, bbox_inches="tight", pad_inches=0.02)
    path = Path(path)
    atomic_write_bytes(path, buffer.getvalue())
    return path


__all__ = ["FIGURE_FORMATS", "ResultFigure", "adopt_into_pyplot", "figure_format",
           "save_figure"]
