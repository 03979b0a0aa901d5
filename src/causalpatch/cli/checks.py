"""Argument checks that run before the model's weights load (docs/cli.md, "Errors before the
weights load").

Two tiers, both before ``InterpretableModel(...)``:

* **Tier 0, no imports**: empty prompts or answers, integer lists (``--layers``, ``--heads``,
  ``--positions``), a component that looks like a typo of a known word, ``--metric``,
  ``--direction``, ``--dtype``, ``--format``, ``--plotly``, executor flags. The vocabularies
  below mirror the library's so that these checks need no torch import
  (``tests/cli/test_cli_startup.py`` checks each mirror against the library).
* **Tier 1, config and tokenizer**: layer and head ranges, ``blocks.N.*`` components, answers
  that are not one token or lack their leading space. These take a
  :class:`~causalpatch.cli.model_info.ModelInfo` (read without weights).

Output paths are checked by :mod:`causalpatch.cli.outputs`. The library checks everything
again after the load; these checks only make the common mistakes fail fast. Every check raises
:func:`causalpatch.cli.failures.error` (one line, exit code 2).
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .failures import error
from .state import warn

if TYPE_CHECKING:
    from .model_info import ModelInfo

#: Mirrors of the library's vocabularies, so that tier-0 checks need no torch import
#: (tests/cli/test_cli_startup.py checks each against the library).
SWEEP_COMPONENTS = ("resid_pre", "resid_mid", "resid_post", "attn", "mlp", "attn_head",
                    "attn_head_q", "attn_head_k", "attn_head_v", "mlp_neuron")
#: Component words that name something readable but not patchable (attention patterns).
READ_ONLY_WORDS = ("attn.pattern", "attn.hook_pattern", "hook_pattern")
COMPONENT_WORDS = (*SWEEP_COMPONENTS, "embed", "ln_final", "hook_resid_pre", "hook_resid_mid",
                   "hook_resid_post", "hook_attn_out", "hook_mlp_out", "attn.z", "attn.q",
                   "attn.k", "attn.v", "mlp.post", "attn.hook_z", "attn.hook_q", "attn.hook_k",
                   "attn.hook_v", "mlp.hook_post", "attn.in", "mlp.in", "attn.raw", "mlp.raw",
                   "mlp.gate", "mlp.up", "mlp.pre", "attn.q_normed", "attn.k_normed",
                   *READ_ONLY_WORDS)
RESID_KINDS = ("resid_pre", "resid_mid", "resid_post")
PER_HEAD_COMPONENTS = ("attn_head", "attn_head_q", "attn_head_k", "attn_head_v")
METRICS = ("logit_diff", "logit", "prob", "logprob", "ce_diff", "l2", "mse", "cosine", "kl")
DIRECTIONS = ("denoise", "noise")
DTYPES = ("float32", "float16", "bfloat16")
TRACE_COMPONENTS = ("resid_pre", "resid_post", "mlp", "attn")
FIGURE_FORMATS = ("png", "svg", "pdf")
PLOTLY_MODES = ("inline", "cdn")


# -- tier 0: no imports -------------------------------------------------------------------------
def ints(text: str | None, what: str) -> list[int] | None:
    """``"0,5,-1"`` as ``[0, 5, -1]`` (None stays None); no empty lists, no repeats."""
    if text is None:
        return None
    try:
        values = [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise error(f"{what} must be comma-separated integers like '0,5,-1', got {text!r}") \
            from None
    if not values:
        raise error(f"{what} is empty; give comma-separated integers like '0,5,-1'")
    if len(set(values)) != len(values):
        raise error(f"{what} has repeated entries: {text!r}")
    return values


def check_prompt(text: str, what: str) -> None:
    if not text.strip():
        raise error(f"{what} is empty: give a prompt with some text")


def check_answer_text(text: str | None, what: str) -> None:
    if text is not None and text == "":
        raise error(f"{what} is empty: give one token, e.g. {what} ' Mary' (with its leading "
                    "space)")


def check_choice(value: str, choices: Sequence[str], what: str) -> None:
    """``value`` is one of ``choices``; otherwise the error suggests the closest one."""
    if value not in choices:
        close = difflib.get_close_matches(value, choices, n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise error(f"unknown {what} {value!r}.{hint} Expected one of {', '.join(choices)}")


def check_component_word(component: str) -> None:
    """Reject a likely typo of a component word (``attn_heads``) at once.

    Anything else (raw module paths, full site names) is checked against the model's config
    in tier 1 or by the library after the load.
    """
    if not component.strip():
        raise error("--component is empty; expected one of " + ", ".join(SWEEP_COMPONENTS))
    if component in READ_ONLY_WORDS or component.endswith((".attn.pattern", ".hook_pattern")):
        raise error(f"--component {component!r} is the attention pattern, which is read-only: "
                    "patch attn.q / attn.k (what it is computed from) or attn_head instead")
    if component in COMPONENT_WORDS or component.startswith("blocks."):
        return
    close = difflib.get_close_matches(component, COMPONENT_WORDS, n=3, cutoff=0.75)
    if close:
        raise error(
            f"unknown component {component!r}. Did you mean: {', '.join(close)}? Expected one "
            f"of {', '.join(SWEEP_COMPONENTS)}, a per-layer site kind (e.g. 'attn.in'), or a "
            "full site name such as 'blocks.5.mlp'")


def is_resid(component: str) -> bool:
    """Whether ``component`` is a residual-stream site (``resid_post``, ``blocks.3.resid_pre``)."""
    leaf = component.split(".")[-1]
    return leaf.removeprefix("hook_") in RESID_KINDS


def check_executor_args(executor: str | None, address: str | None, workers: int | None) -> None:
    """``--executor local|ray``; ``--address`` and ``--workers`` only with ``ray``."""
    if executor is None or executor == "local":
        if address is not None or workers is not None:
            raise error("--address and --workers need --executor ray")
        return
    if executor != "ray":
        raise error(f"unknown --executor {executor!r}; expected local or ray")
    if workers is not None and workers < 1:
        raise error(f"--workers must be at least 1, got {workers}")


# -- tier 1: the model's config and tokenizer, no weights ---------------------------------------
def check_layers(info: ModelInfo, layers: list[int] | None, what: str = "--layers") -> None:
    """Every layer index within the model's layer count (negative ones count from the end)."""
    n = info.dims.n_layers
    for layer in layers or []:
        if not -n <= layer < n:
            raise error(f"{what} contains {layer}, out of range: this model has {n} layers, so "
                        f"{what} must be in [{-n}, {n - 1}]")


def check_component(info: ModelInfo, component: str, heads: list[int] | None,
                    option: str = "--component") -> None:
    """``blocks.N.*`` in range, the site kind present in this model, ``--heads`` in range and
    only for per-head components. ``option``: the flag the messages name."""
    kind: str | None = component
    if component.startswith("blocks."):
        parts = component.split(".", 2)
        if len(parts) == 3 and parts[1].lstrip("-").isdigit():
            check_layers(info, [int(parts[1])], f"{option} {component!r}: layer")
            kind = parts[2]
        else:
            kind = None
    if info.family_kinds and kind is not None:  # the adapters' view (torch is loaded)
        from ..names import canonical_kind

        kind = canonical_kind(kind)
        if kind in info.family_kinds and kind not in info.kinds:
            raise error(f"{option.lstrip('-')} {component!r} does not exist in this "
                        f"{info.architecture} model (config); it has {', '.join(info.kinds)}")
    if heads is not None and component in PER_HEAD_COMPONENTS:
        n = info.dims.n_heads
        for h in heads:
            if not 0 <= h < n:
                raise error(f"--heads contains {h}, out of range: this model has {n} heads, "
                            f"so --heads must be in [0, {n - 1}]")
    elif heads is not None and component in (*RESID_KINDS, "attn", "mlp", "mlp_neuron"):
        raise error(f"--heads given but component {component!r} has no heads; use "
                    "--component attn_head (or attn_head_q/k/v)")


def shell_quote(text: str) -> str:
    """``text`` quoted for a POSIX shell, as the error messages suggest typing it."""
    return "'" + text.replace("'", "'\\''") + "'"


def check_answer(info: ModelInfo, answer: str | None, prompts: Sequence[str], what: str) -> None:
    """One token; and, after a prompt ending in a word, mind the leading space."""
    if answer is None:
        return
    ids = info.answer_ids(answer)
    needs_space = (not answer[:1].isspace()
                   and any(p and not p[-1:].isspace() for p in prompts))
    spaced = info.answer_ids(" " + answer) if needs_space else []
    if len(ids) != 1:
        hint = "answers must be single tokens (mind the leading space)"
        if needs_space and len(spaced) == 1:
            hint = (f"{' ' + answer!r} (with a leading space) is one token, and after a word "
                    f"that is what the model predicts: {what} {shell_quote(' ' + answer)}")
        raise error(f"{what} {answer!r} is {len(ids)} tokens for this tokenizer "
                    f"({info.pieces(ids)}), expected exactly one; {hint}")
    if needs_space and len(spaced) == 1 and spaced[0] != ids[0]:
        warn(f"{what} {answer!r} has no leading space. After a word the model predicts "
             f"{' ' + answer!r} (token {spaced[0]}), a different token from {answer!r} (token "
             f"{ids[0]}). Did you mean {what} {shell_quote(' ' + answer)}?")
