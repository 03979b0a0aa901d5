"""``causalpatch circuit``: edge attribution (``eap`` or ``eap_ig``) of one clean/corrupted pair
(``--clean``/``--corrupted``) or of IOI pairs (``--dataset ioi``), the top edges, and the
faithfulness of the circuit of the ``--edges`` best edges; writes ``edges.json`` (every edge's
score), ``circuit.json``, ``faithfulness.json`` and ``report.html`` (the best edges drawn as a
circuit by layer, the circuit, its faithfulness: :func:`causalpatch.render.html.report`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from .. import model_info, runtime
from ..checks import DTYPES, check_answer, check_answer_text, check_choice, check_prompt
from ..failures import error, user_errors
from ..options import DTYPE_HELP, JSON_HELP, MODEL_HELP
from ..outputs import check_out_dir, emit_json
from ..state import State, out_console

#: The scoring methods of this command (``exact`` scores one row per edge: use the library
#: with ``edges=`` for it).
CIRCUIT_METHODS = ("eap", "eap_ig")


def circuit(
    clean: str | None = typer.Option(None, help="Clean prompt (with --corrupted)."),
    corrupted: str | None = typer.Option(
        None, help="Corrupted prompt (same number of tokens as --clean)."),
    dataset: str | None = typer.Option(
        None, help="ioi: IOI pairs, each with its own answers (instead of --clean)."),
    n: int = typer.Option(8, help="Number of pairs with --dataset."),
    seed: int = typer.Option(0, help="Dataset seed."),
    correct: str | None = typer.Option(None, help="Answer token, e.g. ' Mary'."),
    incorrect: str | None = typer.Option(None, help="Competing answer, e.g. ' John'."),
    method: str = typer.Option("eap", help="eap or eap_ig."),
    ig_steps: int = typer.Option(5, help="eap_ig's interpolation steps."),
    edges: int = typer.Option(200, help="Edges in the circuit whose faithfulness is measured "
                                        "(before pruning)."),
    greedy: bool = typer.Option(False, "--greedy",
                                help="Grow the circuit from the logits (EAP-IG's greedy "
                                     "search) instead of taking the top edges."),
    top: int = typer.Option(10, help="Edges to print."),
    model: str = typer.Option("smollm2", help=MODEL_HELP),
    dtype: str | None = typer.Option(None, help=DTYPE_HELP),
    out: Path = typer.Option(Path("out/circuit"), help="Output folder."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Edge attribution, the top edges, and the faithfulness of the top circuit.

    Noising, as EAP and EAP-IG: scores are the normalised damage of patching each edge to
    the corrupted run; faithfulness = (M(circuit) - M(corrupted)) / (M(clean) -
    M(corrupted)) with every edge outside the circuit patched. Writes edges.json,
    circuit.json, faithfulness.json and report.html (the top edges drawn by layer, the
    circuit and its faithfulness; self-contained, opens offline).

    Example:

      causalpatch circuit --clean "When Mary and John went to the store, John gave a drink to" \\
        --corrupted "When Mary and John went to the store, Mary gave a drink to" \\
        --correct " Mary" --incorrect " John" --edges 300 --out out/circuit

      causalpatch circuit --dataset ioi --n 8 --method eap_ig --greedy --out out/circuit_ioi
    """
    with user_errors():
        State.json = as_json = as_json or State.json
        # tier 0: no imports
        if dataset is None and (clean is None or corrupted is None):
            raise error("give --clean and --corrupted (with --correct/--incorrect), or "
                        "--dataset ioi")
        if dataset is not None:
            if clean is not None or corrupted is not None:
                raise error("give either --clean/--corrupted or --dataset ioi, not both")
            if dataset != "ioi":
                raise error(f"unknown --dataset {dataset!r}; expected ioi")
            if correct is not None or incorrect is not None:
                raise error("--correct and --incorrect are for --clean/--corrupted; each IOI "
                            "pair has its own answers")
            if n < 1:
                raise error(f"--n must be at least 1, got {n}")
        else:
            assert clean is not None and corrupted is not None
            check_prompt(clean, "--clean")
            check_prompt(corrupted, "--corrupted")
            check_answer_text(correct, "--correct")
            check_answer_text(incorrect, "--incorrect")
        check_choice(method, CIRCUIT_METHODS, "--method")
        if ig_steps < 1:
            raise error(f"--ig-steps must be at least 1, got {ig_steps}")
        if edges < 1:
            raise error(f"--edges must be at least 1, got {edges}")
        if top < 1:
            raise error(f"--top must be at least 1, got {top}")
        if dtype is not None:
            check_choice(dtype, DTYPES, "--dtype")
        check_out_dir(out)
        # tier 1: config and tokenizer, no weights
        info = model_info.inspect_model(model)
        if info is not None and clean is not None and corrupted is not None:
            lengths = (len(info.prompt_ids(clean)), len(info.prompt_ids(corrupted)))
            if lengths[0] != lengths[1]:
                raise error(f"--clean is {lengths[0]} tokens and --corrupted {lengths[1]}: "
                            "an edge compares the two runs token by token, so make them the "
                            "same length")
            check_answer(info, correct, [clean, corrupted], "--correct")
            check_answer(info, incorrect, [clean, corrupted], "--incorrect")
        m = runtime.load_model(model, dtype)
        from ...methods.circuits import evaluate_circuit
        from ...methods.edges import edge_attribution

        data: Any
        kw: dict[str, Any]
        if dataset is not None:
            from ...datasets import IOIDataset

            data, kw = IOIDataset(m, n=n, seed=seed), {}
        else:
            data, kw = clean, {"corrupted": corrupted, "correct": correct,
                               "incorrect": incorrect}
        progress = None if State.progress and not (as_json or State.quiet) else False
        scores = edge_attribution(m, data, method=method, ig_steps=ig_steps,
                                  progress=progress, **kw)
        chosen = scores.circuit(min(edges, int(scores.scored.sum())), greedy=greedy)
        evaluation = evaluate_circuit(m, data, chosen, progress=progress, **kw)
        out.mkdir(parents=True, exist_ok=True)
        files = {"edges": str(out / "edges.json"), "circuit": str(out / "circuit.json"),
                 "faithfulness": str(out / "faithfulness.json"),
                 "report": str(out / "report.html")}
        scores.to_json(files["edges"])
        chosen.to_json(files["circuit"])
        import json

        from ..._io import atomic_write_text

        atomic_write_text(Path(files["faithfulness"]), json.dumps(evaluation.to_dict()))
        from ...render.html import report

        report([scores, chosen, evaluation], files["report"],
               title=f"causalpatch circuit: {scores.method} on {scores.model_name or model}")
    _show(scores, chosen, evaluation, top, greedy, files, as_json)


def _show(scores: Any, chosen: Any, evaluation: Any, top: int, greedy: bool,
          files: dict[str, str], as_json: bool) -> None:
    """``--json``: one document (files, top edges, the circuit's faithfulness); otherwise a
    table of the top edges and one line for the circuit (nothing with ``--quiet``)."""
    rows = scores.top(top)
    how = "greedy" if greedy else "top"
    if as_json or State.json:
        emit_json({"files": files, "method": scores.method, "n_pairs": scores.n_pairs,
                   "n_graph_edges": scores.graph.n_edges,
                   "top": [{"src": s, "dst": d, "score": v} for s, d, v in rows],
                   "circuit": {"selection": how, "n_edges": chosen.n_edges,
                               **evaluation.to_dict()}})
        return
    if State.quiet:
        return
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"{scores.method} on {scores.model_name or 'the model'}: top "
                        f"{len(rows)} of {scores.graph.n_edges:,} edges ({scores.n_pairs} "
                        f"pair{'s' if scores.n_pairs != 1 else ''}, noising)")
    for col in ("src", "dst", "score"):
        table.add_column(col, justify="right" if col == "score" else "left")
    for s, d, v in rows:
        table.add_row(escape(s), escape(d), f"{v:+.4f}")
    out_console.print(table)
    out_console.print(
        f"circuit ({how}, {chosen.n_edges} edges after pruning, {len(chosen.nodes)} nodes): "
        f"faithfulness {evaluation.faithfulness:+.4f} (metric {evaluation.circuit_value:.4g}; "
        f"clean {evaluation.clean_value:.4g}, corrupted {evaluation.corrupted_value:.4g})",
        highlight=False, soft_wrap=True)
    for name, path in files.items():
        out_console.print(f"[green]wrote[/] {escape(name)}: {escape(path)}")
