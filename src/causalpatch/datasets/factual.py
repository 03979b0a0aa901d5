"""Factual recall: the ROME "known facts" (Meng et al., 2022), with subjects swapped.

The packaged ``data/known_1000.json`` (MIT licence; see ``data/ATTRIBUTION.md``) holds 1,209
facts, each a ``subject``, a ``relation_id`` (e.g. ``"P30"``, continent) and an ``attribute``,
with a ``prompt`` that names the subject and stops before the attribute.
:func:`load_known_facts` reads it; :func:`known_facts` returns the facts a model completes
correctly (top-1 next token), as :class:`KnownFact` tuples, for causal tracing.

:class:`FactualRecallDataset` pairs the facts. Clean: a fact's prompt, "Vinson Massif is
located in the continent of", with ``correct`` the first token of " Antarctica". Corrupted: the
same prompt with the subject of another fact of the same relation whose prompt then has the
same token length; ``incorrect`` is the first token of that fact's attribute. Both answers are
the first token of ``" " + attribute``; pairs whose two answers coincide are skipped.

Roles (per token of the clean prompt, ROME's names): ``"subject first"``, ``"subject middle"``,
``"subject last"``, ``"first after"`` (the token after the subject), ``"END"``; ``""``
elsewhere. Metric: ``"logit_diff"`` (the clean fact's attribute minus the other's).
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import torch

from ..errors import InvalidArgumentError
from ..tokens import prepended_bos
from .base import PatchingDataset, check_n, n_tokens
from .roles import token_roles

if TYPE_CHECKING:
    from ..model import HookedModel


# -- the known facts --------------------------------------------------------------------------
def load_known_facts(path: str | Path | None = None) -> list[dict[str, Any]]:
    """The ROME "known facts" (Meng et al., 2022; MIT licence) shipped with the package.

    Returns a list of dicts with ``known_id``, ``subject``, ``attribute``, ``template``,
    ``prediction``, ``prompt`` and ``relation_id`` (1,209 facts). ``path`` reads another file
    of the same format instead.
    """
    if path is not None:
        text = Path(path).read_text(encoding="utf-8")
    else:
        text = resources.files("causalpatch").joinpath("data/known_1000.json").read_text(
            encoding="utf-8")
    facts = json.loads(text)
    if not isinstance(facts, list) or not facts:
        raise InvalidArgumentError("known facts file must hold a non-empty JSON list")
    need = ("subject", "attribute", "prompt", "relation_id")
    for i, fact in enumerate(facts):
        if not isinstance(fact, dict) or any(k not in fact for k in need):
            raise InvalidArgumentError(f"known fact {i} must be an object with fields {need}")
        if fact["subject"] not in fact["prompt"]:
            raise InvalidArgumentError(
                f"known fact {i}: subject {fact['subject']!r} does not occur in its prompt")
    return facts


class KnownFact(NamedTuple):
    """A fact from :func:`known_facts`: ``prompt``, ``subject`` and ``attribute_token``, the id
    of the first token of ``" " + attribute``."""

    prompt: str
    subject: str
    attribute_token: int


def _first_token(model: HookedModel, text: str) -> int:
    """Id of the first token of ``" " + text`` (no special tokens)."""
    ids = model.tokenizer.encode(" " + text.strip(), add_special_tokens=False)
    if not ids:
        raise InvalidArgumentError(f"{text!r} has no tokens for this tokenizer")
    return int(ids[0])


def known_facts(model: HookedModel, n: int | None = 100, seed: int = 0,
                only_correct: bool = True, path: str | Path | None = None,
                batch_size: int = 32, prepend_bos: bool | int = False) -> list[KnownFact]:
    """Up to ``n`` known facts, shuffled with ``seed``, that the model gets right.

    With ``only_correct=True`` a fact is kept when the model's top-1 next token after
    ``prompt`` is the first token of ``" " + attribute`` (one forward pass per ``batch_size``
    prompts, stopping once ``n`` are found). Fewer than ``n`` are returned when the file has
    fewer; ``n=None`` checks all of them (:func:`known_fraction` counts them).
    ``prepend_bos``: judge the prompts with the tokenizer's BOS token (``True``) or the given
    token id in front (as causal tracing's ``prepend_bos``); the prompts returned are the
    facts' own.

    Example::

        for prompt, subject, token in known_facts(model, n=3):
            print(prompt, "->", model.tokenizer.decode([token]))
    """
    if n is not None:
        check_n(n)
    if batch_size < 1:
        raise InvalidArgumentError(f"batch_size must be at least 1, got {batch_size}")
    bos = prepended_bos(model, prepend_bos)
    facts = load_known_facts(path)
    random.Random(seed).shuffle(facts)
    out: list[KnownFact] = []
    limit = len(facts) if n is None else n
    for lo in range(0, len(facts), batch_size):
        chunk = facts[lo:lo + batch_size]
        answers = [_first_token(model, f["attribute"]) for f in chunk]
        if only_correct:
            prompts: list[Any] = [f["prompt"] for f in chunk]
            if bos is not None:
                prompts = [[bos, *ids] if ids[0] != bos else ids
                           for ids in (list(model.tokenizer(p)["input_ids"]) for p in prompts)]
            with torch.no_grad():
                top = model.trace(prompts).run().last_logits.argmax(-1)
            keep = [int(t) == a for t, a in zip(top.tolist(), answers)]
        else:
            keep = [True] * len(chunk)
        for fact, answer, ok in zip(chunk, answers, keep):
            if ok:
                out.append(KnownFact(fact["prompt"], fact["subject"], answer))
                if len(out) >= limit:
                    return out
    return out


class KnownFraction(NamedTuple):
    """How many facts of a known-facts file a model completes correctly (:func:`known_facts`'
    test: the top-1 next token is the first token of ``" " + attribute``)."""

    known: int
    total: int

    @property
    def fraction(self) -> float:
        """``known / total``."""
        return self.known / self.total


def known_fraction(model: HookedModel, path: str | Path | None = None, batch_size: int = 32,
                   prepend_bos: bool | int = False) -> KnownFraction:
    """Check every fact of the file (the packaged 1,209 by default) and count those the model
    completes correctly: ``known_fraction(model).fraction``. One forward pass per
    ``batch_size`` prompts; ``prepend_bos`` as :func:`known_facts`."""
    total = len(load_known_facts(path))
    known = known_facts(model, None, path=path, batch_size=batch_size, prepend_bos=prepend_bos)
    return KnownFraction(len(known), total)


# -- roles ------------------------------------------------------------------------------------
def _subject_roles(model: HookedModel, prompt: str, subject: str) -> list[str] | None:
    """ROME's roles: subject first / middle / last, first after (the subject), END."""
    start = prompt.find(subject)
    roles = token_roles(model, prompt, [(start, start + len(subject), "subject")])
    if roles is None:
        return None
    where = [i for i, r in enumerate(roles) if r == "subject"]
    for i in where:
        roles[i] = "subject middle"
    roles[where[0]] = "subject first"
    roles[where[-1]] = "subject last"
    if where[-1] + 1 < len(roles) and not roles[where[-1] + 1]:
        roles[where[-1] + 1] = "first after"
    return roles


# -- the dataset ------------------------------------------------------------------------------
class FactualRecallDataset(PatchingDataset):
    """Counterfactual pairs from the known facts: the subject swapped within one relation.

    Clean: a fact's ``prompt``, e.g. "Vinson Massif is located in the continent of"
    (``correct`` = first token of " Antarctica"). Corrupted: the same prompt with the subject
    of another fact of the same ``relation_id`` whose prompt then has the same total token
    length; ``incorrect`` = first token of " " + that fact's attribute. Pairs whose two answer
    tokens coincide are skipped; each fact is the clean prompt of at most one pair.

    Args:
        model: gives the tokenizer.
        n: number of pairs (error if the facts allow fewer).
        seed: shuffles facts and partners (``random.Random(seed)``).
        relation: keep only this ``relation_id`` (e.g. ``"P30"``, continents).
        path: another known-facts JSON file instead of the packaged one.

    Attributes (one entry per pair): ``subjects``, ``corrupted_subjects`` (for causal
    tracing), ``relation_ids``, ``attributes``, ``corrupted_attributes``, ``known_ids``,
    ``corrupted_known_ids``; ``roles`` (per token of the clean prompt: ``"subject first"``,
    ``"subject middle"``, ``"subject last"``, ``"first after"``, ``"END"`` or ``""``).

    Example::

        facts = FactualRecallDataset(model, n=8, relation="P30")
        facts.clean[0], facts.corrupted[0], facts.subjects[0]
    """

    per_pair_fields: ClassVar[tuple[str, ...]] = (
        "subjects", "corrupted_subjects", "relation_ids", "attributes", "corrupted_attributes",
        "known_ids", "corrupted_known_ids", "roles")

    def __init__(self, model: HookedModel, n: int = 32, seed: int = 0,
                 relation: str | None = None, path: str | Path | None = None) -> None:
        check_n(n)
        facts = load_known_facts(path)
        if relation is not None:
            facts = [f for f in facts if f["relation_id"] == relation]
            if not facts:
                raise InvalidArgumentError(f"no known facts with relation_id {relation!r}")
        by_relation: dict[str, list[int]] = defaultdict(list)
        for i, fact in enumerate(facts):
            by_relation[fact["relation_id"]].append(i)
        rng = random.Random(seed)
        order = list(range(len(facts)))
        rng.shuffle(order)
        answer = [_first_token(model, f["attribute"]) for f in facts]
        rows: dict[str, list[Any]] = defaultdict(list)
        for i in order:
            a = facts[i]
            prefix, _, suffix = a["prompt"].partition(a["subject"])
            target = n_tokens(model, a["prompt"])
            partners = [j for j in by_relation[a["relation_id"]] if j != i]
            rng.shuffle(partners)
            for j in partners:
                b = facts[j]
                if b["subject"] == a["subject"] or answer[j] == answer[i]:
                    continue
                text = prefix + b["subject"] + suffix
                if n_tokens(model, text) != target:
                    continue
                for key, value in (("clean", a["prompt"]), ("corrupted", text),
                                   ("correct", answer[i]), ("incorrect", answer[j]),
                                   ("subjects", a["subject"]), ("corrupted_subjects", b["subject"]),
                                   ("relation_ids", a["relation_id"]),
                                   ("attributes", a["attribute"]),
                                   ("corrupted_attributes", b["attribute"]),
                                   ("known_ids", a.get("known_id", i)),
                                   ("corrupted_known_ids", b.get("known_id", j))):
                    rows[key].append(value)
                break
            if len(rows["clean"]) >= n:
                break
        found = len(rows["clean"])
        if found < n:
            where = f" with relation_id {relation!r}" if relation is not None else ""
            raise InvalidArgumentError(
                f"only {found} factual pairs{where} have an equal-length partner with a "
                f"different answer; asked for n={n}")
        rows["roles"] = [_subject_roles(model, c, sub)
                         for c, sub in zip(rows["clean"], rows["subjects"])]
        for key in self.per_pair_fields:
            setattr(self, key, rows[key])
        super().__init__(rows["clean"], rows["corrupted"], rows["correct"], rows["incorrect"],
                         "logit_diff", {}, "factual_recall", {"seed": seed, "relation": relation},
                         model=model)
