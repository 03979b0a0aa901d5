"""The ``causalpatch`` command line (docs/cli.md).

Examples::

    causalpatch patch --model smollm2 \\
        --clean "When Mary and John went to the store, John gave a drink to" \\
        --corrupted "When Mary and John went to the store, Mary gave a drink to" \\
        --correct " Mary" --incorrect " John" --component attn_head --out out/ioi
    causalpatch ioi --model smollm2 --n 16 --out out/demo
    causalpatch ioi --n 256 --executor ray --address HOST:PORT --workers 8
    causalpatch trace --model smollm2 --prompt "The Eiffel Tower is in the city of" \\
        --subject "Eiffel Tower" --out out/trace
    causalpatch trace --dataset known_facts --n 100 --out out/rome
    causalpatch report out/ioi/*.json out/trace/*.json --out report.html
    causalpatch models
    causalpatch info smollm2

The package, one idea per module:

* :mod:`~causalpatch.cli.app`: the typer app, its commands, the global flags (also after the
  subcommand). ``causalpatch.cli.app`` is the typer app itself (the console script
  ``causalpatch = "causalpatch.cli:app"``); the module is ``sys.modules["causalpatch.cli.app"]``.
* :mod:`~causalpatch.cli.state`: what the global flags decided; notes, warnings, consoles.
* :mod:`~causalpatch.cli.failures`: one-line errors and exit codes (2, or 1 when the outputs
  were saved elsewhere).
* :mod:`~causalpatch.cli.checks`: argument checks before the weights load (tier 0: no
  imports; tier 1: the model's config and tokenizer).
* :mod:`~causalpatch.cli.model_info`: the config and tokenizer without weights.
* :mod:`~causalpatch.cli.runtime`: the weights and the executor.
* :mod:`~causalpatch.cli.outputs`: output paths probed before the compute, files written after
  it (never lost), tables and JSON.
* :mod:`~causalpatch.cli.progress`: progress bars: the library's own, passed through.
* :mod:`~causalpatch.cli.sweeps`: the sweeps as numbered steps with checkpoints in
  ``OUT/.checkpoints``; Ctrl-C/SIGTERM write the finished steps, ``--resume`` continues.
* :mod:`~causalpatch.cli.options`: option declarations that commands share.
* :mod:`causalpatch.cli.commands`: one module per command.

Commands reach the model through ``model_info.inspect_model`` and ``runtime.load_model`` (module
attributes, looked up at call time): to run the commands on another model, substitute those two
(``monkeypatch.setattr(causalpatch.cli.runtime, "load_model", ...)``), as the tests do.

Importing this package imports neither torch nor transformers. User errors print one line and
exit with code 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

from . import checks, model_info, outputs, runtime
from .app import GLOBAL_FLAGS, app, hoist_global_flags, main, run
from .checks import (COMPONENT_WORDS, DIRECTIONS, DTYPES, FIGURE_FORMATS, METRICS,
                     PER_HEAD_COMPONENTS, PLOTLY_MODES, RESID_KINDS, SWEEP_COMPONENTS,
                     TRACE_COMPONENTS, check_answer)
from .failures import OutputsSavedElsewhere
from .model_info import ConfigDims, FastTokenizer, ModelInfo
from .outputs import check_out_dir, check_out_file, save_outputs
from .progress import progress_mode
from .state import State

__all__ = [
    "COMPONENT_WORDS", "DIRECTIONS", "DTYPES", "FIGURE_FORMATS", "GLOBAL_FLAGS", "METRICS",
    "PER_HEAD_COMPONENTS", "PLOTLY_MODES", "RESID_KINDS", "SWEEP_COMPONENTS", "TRACE_COMPONENTS",
    "ConfigDims", "FastTokenizer", "ModelInfo", "OutputsSavedElsewhere",
    "State", "app", "check_answer", "check_out_dir", "check_out_file", "checks",
    "hoist_global_flags", "main", "model_info", "outputs", "progress_mode", "run", "runtime",
    "save_outputs",
]
