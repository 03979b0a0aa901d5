"""``ResultFigure``: a matplotlib ``Figure`` whose ``show()`` works without pyplot.

:func:`causalpatch.render.plots.plot_result` builds figures with the object API, so making
one touches no pyplot state (nothing accumulates in pyplot's figure list in a long sweep). A
plain ``Figure`` made that way has no figure manager, and ``Figure.show()`` then raises
``AttributeError: Figure.show works only for figures managed by pyplot``. ``ResultFigure``
hands itself to pyplot on the first ``show()`` instead, so ``result.plot().show()`` works.

This module imports matplotlib at import time; import it lazily (inside functions).
"""

from __future__ import annotations

from matplotlib.figure import Figure


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


__all__ = ["ResultFigure", "adopt_into_pyplot"]
