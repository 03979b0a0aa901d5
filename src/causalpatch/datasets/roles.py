"""Position roles: which token of a prompt plays which part in its task.

A task names the tokens that matter for its mechanism: IOI's ``"IO"``, ``"S1"``, ``"S1+1"``,
``"S2"`` (Wang et al., 2022), ROME's ``"subject first"`` … ``"first after"`` (Meng et al.,
2022), greater-than's ``"NOUN"``, ``"XX1"``, ``"YY"`` (Hanna et al., 2023), induction's
``"A0"``.. / ``"B0"``... A dataset keeps one list per pair (``roles``), one role per token of the
clean prompt, ``""`` (:data:`NO_ROLE`) for a token without one and ``"END"`` for the last; results
store them as ``extra["position_roles"]`` (:func:`dataset_roles`).

:func:`token_roles` maps character spans of a prompt to its tokens exactly as the patching
functions tokenise it; :func:`format_spans` fills a template and reports where each field went.
Each task module turns its own fields into roles with these two.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..model import HookedModel

#: Role of a token that has none (most template words).
NO_ROLE = ""


def format_spans(form: str, values: dict[str, str]) -> tuple[str, dict[str, tuple[int, int]]]:
    """``form.format(**values)`` and the character span of every field in the result."""
    out, spans, at = [], {}, 0
    for literal, fname, _, _ in string.Formatter().parse(form):
        out.append(literal)
        at += len(literal)
        if fname is not None:
            value = values[fname]
            spans[fname] = (at, at + len(value))
            out.append(value)
            at += len(value)
    return "".join(out), spans


def token_roles(model: HookedModel, text: str,
                spans: Sequence[tuple[int, int, str]]) -> list[str] | None:
    """One role per token of ``text`` as the patching functions tokenise it.

    ``spans`` are ``(start, end, role)`` character ranges; a token gets the role of the span it
    ends in (a leading space belongs to the word after it). The last token gets ``"END"``
    unless a span names it. Returns None when the tokens of a prefix are not a prefix of the
    tokens (a token straddles a span boundary), so the roles would be wrong.
    """
    from ..tokens import token_lists

    ids = token_lists(model, text)[0]
    plain = model.tokenizer.encode(text, add_special_tokens=False)
    lead = len(ids) - len(plain)
    roles = [NO_ROLE] * len(ids)

    def boundary(char: int) -> int | None:
        if char <= 0:
            return lead
        if char >= len(text):
            return len(ids)
        prefix = token_lists(model, text[:char])[0]
        return len(prefix) if ids[:len(prefix)] == prefix else None

    for start, end, role in spans:
        if start > 0 and text[start - 1] == " ":
            start -= 1
        lo, hi = boundary(start), boundary(end)
        if lo is None or hi is None or hi <= lo:
            return None
        for t in range(lo, hi):
            roles[t] = role
    if roles and not roles[-1]:
        roles[-1] = "END"
    return roles


def dataset_roles(dataset: Any) -> list[list[str] | None] | None:
    """The per-pair position roles of a dataset (its ``roles`` list), or None.

    One list per pair with one role per token of the clean prompt (``""`` for none; None for a
    pair whose roles could not be placed). Results store them as
    ``extra["position_roles"]``.
    """
    roles = getattr(dataset, "roles", None)
    if isinstance(roles, list) and len(roles) == len(dataset):
        return roles
    return None
