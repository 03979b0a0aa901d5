"""``causalpatch models``: the model aliases, whether their packages are installed, and the
architecture adapters. Imports neither torch nor transformers
(``tests/cli/test_cli_startup.py``)."""

from __future__ import annotations

from typing import Any

import typer

from ..outputs import emit_json
from ..state import State, out_console


def models(as_json: bool = typer.Option(False, "--json", help="Machine-readable JSON.")) -> None:
    """List model aliases, whether their packages are installed, and supported architectures.

    Example:

      causalpatch models
    """
    from ...adapters import ADAPTERS  # torch-free once adapters/base.py imports torch lazily
    from ...loading import ALIASES, GEMMA3_PACKAGE, SMOLLM2_PACKAGE, package_dir

    smollm2 = package_dir(SMOLLM2_PACKAGE) is not None
    installed = {"smollm2": smollm2, "smollm2-135m": smollm2,
                 "gemma3-270m": package_dir(GEMMA3_PACKAGE) is not None}
    data: dict[str, list[dict[str, Any]]] = {
        "aliases": [{"alias": a, "description": d, "installed": installed.get(a, False)}
                    for a, d in ALIASES.items()],
        "adapters": [{"name": a.name, "model_types": list(a.model_types)} for a in ADAPTERS]}
    if as_json or State.json:
        emit_json(data)
        return
    if State.quiet:
        return
    from rich.table import Table

    table = Table(title="model aliases")
    for col in ("alias", "description", "installed"):
        table.add_column(col)
    for row in data["aliases"]:
        table.add_row(row["alias"], row["description"], "yes" if row["installed"] else "no")
    out_console.print(table)
    adapters = Table(title="architecture adapters")
    adapters.add_column("adapter")
    adapters.add_column("config.model_type")
    for row in data["adapters"]:
        adapters.add_row(row["name"], ", ".join(row["model_types"]))
    out_console.print(adapters)
