"""The commands of ``causalpatch``, one per module: ``patch``, ``ioi``, ``trace``, ``report``,
``models``, ``info`` and the ``sae`` group (``sae train``, ``sae info``).

Each module holds the command as a plain function whose parameters are typer options;
:mod:`causalpatch.cli.app` registers them (``sae`` is a typer group of its own, added under
``sae``). A command body checks its arguments (tier 0, then tier 1:
:mod:`causalpatch.cli.checks`), probes its output path, and only then loads the weights, runs
the library and writes its outputs; it imports torch and the library inside its body, so that
``causalpatch --help`` and ``causalpatch models`` stay fast.
"""
