"""Indirect object identification (IOI), after Wang et al. (2022).

Clean: a template sentence in which two people appear and one of them, the subject, is named a
second time as the giver: "When Mary and John went to the store, John gave a drink to". The
model should complete it with the other name, the indirect object: ``correct`` is " Mary" (the
IO), ``incorrect`` " John" (the subject). Corrupted, by ``corruption``:

* ``"swap"`` — the second subject mention (S2) becomes the other name ("..., Mary gave a drink
  to"), so the repeated name, and hence the right answer, flips;
* ``"abc"`` — the three name slots get three other distinct names ("When Paul and Kate went to
  the store, Lucy gave a drink to"), so no name of the clean prompt is there to copy.

``order`` picks ABBA (the IO mentioned first, as above) or BABA (the subject first, "John and
Mary ..., John"), or alternates them. Templates are written in ABBA form with ``{A}`` (IO),
``{B}`` (subject, twice), ``{place}`` and ``{object}`` (:data:`IOI_TEMPLATES`,
:data:`IOI_NAMES`, :data:`IOI_PLACES`, :data:`IOI_OBJECTS`; written for causalpatch).

Roles (per token of the clean prompt, Wang et al.'s names): ``"IO"``, ``"S1"`` (the first
subject mention), ``"S1+1"`` (the token after it), ``"S2"``, ``"END"``; ``""`` elsewhere.
Metric: ``"logit_diff"`` (IO minus subject).
"""

from __future__ import annotations

import random
import string
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

from ..errors import InvalidArgumentError, InvalidTypeError
from .base import PatchingDataset, check_n, n_tokens
from .roles import format_spans, token_roles

if TYPE_CHECKING:
    from ..model import HookedModel


# -- templates and names ----------------------------------------------------------------------
#: IOI templates, written in ABBA form: ``{A}`` the indirect object, ``{B}`` the subject.
#: ``{place}`` and ``{object}`` are filled from :data:`IOI_PLACES` / :data:`IOI_OBJECTS`.
IOI_TEMPLATES: tuple[str, ...] = (
    "When {A} and {B} went to the {place}, {B} gave a {object} to",
    "After {A} and {B} arrived at the {place}, {B} handed a {object} to",
    "While {A} and {B} were sitting in the {place}, {B} passed a {object} to",
    "Then, {A} and {B} spent the afternoon at the {place}. {B} gave a {object} to",
    "Yesterday {A} and {B} were working at the {place}, and {B} offered a {object} to",
    "When {A} and {B} came back from the {place}, {B} brought a {object} to",
    "Once {A} and {B} met at the {place}, {B} sent a {object} to",
    "After lunch, {A} and {B} walked to the {place}. {B} showed a {object} to",
    "Because {A} and {B} were late for the {place}, {B} lent a {object} to",
    "On Sunday {A} and {B} visited the {place}, where {B} sold a {object} to",
    "Later, {A} and {B} were cleaning the {place}, and {B} tossed a {object} to",
    "In the morning {A} and {B} went over to the {place}. {B} returned a {object} to",
)
#: Common English first names; only those that are one token with a leading space are used.
IOI_NAMES: tuple[str, ...] = (
    "Mary", "John", "Alice", "Bob", "James", "Sarah", "David", "Emma", "Michael", "Anna",
    "Tom", "Lisa", "Paul", "Laura", "Mark", "Kate", "Peter", "Jane", "George", "Rachel",
    "Daniel", "Emily", "Chris", "Anne", "Steve", "Amy", "Kevin", "Helen", "Brian", "Susan",
    "Jack", "Linda", "Eric", "Karen", "Adam", "Julia", "Ryan", "Grace", "Sam", "Lucy",
    "Henry", "Nancy", "Frank", "Alex", "Robert", "Maria", "Richard", "Jessica", "Tim", "Joe",
    "Ben", "Dan", "Matt", "Nick", "Andrew", "Scott", "Jennifer", "Victoria", "Sophie", "Oliver",
    "Ethan", "Chloe", "Martin", "Claire",
)
IOI_PLACES: tuple[str, ...] = ("store", "school", "park", "hospital", "station", "office",
                               "garden", "market", "restaurant", "library", "beach", "museum")
IOI_OBJECTS: tuple[str, ...] = ("drink", "book", "ball", "gift", "bag", "letter", "key", "ring",
                                "bottle", "basket", "pen", "ticket")
_IOI_EXTRA_FIELDS = {"place", "object"}


def _ioi_template(template: str) -> str:
    """Rewrite an ABBA template's name slots as ``{n0} {n1} {n2}``; refuse malformed ones."""
    if not isinstance(template, str):
        raise InvalidTypeError(f"IOI templates must be strings, got {type(template).__name__}")
    out: list[str] = []
    slots: list[str] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise InvalidArgumentError(
            f"IOI template {template!r} is not a format string: {exc}") from None
    for literal, fname, spec, conv in parsed:
        out.append(literal.replace("{", "{{").replace("}", "}}"))
        if fname is None:
            continue
        if spec or conv:
            raise InvalidArgumentError(f"IOI template {template!r}: no format specs allowed")
        if fname in ("A", "B"):
            out.append("{n" + str(len(slots)) + "}")
            slots.append(fname)
        elif fname in _IOI_EXTRA_FIELDS:
            out.append("{" + fname + "}")
        else:
            raise InvalidArgumentError(
                f"IOI template {template!r} has an unknown field {{{fname}}}; allowed: {{A}} "
                "(indirect object), {B} (subject), {place}, {object}")
    if slots != ["A", "B", "B"]:
        raise InvalidArgumentError(
            f"IOI template {template!r} must name {{A}}, {{B}}, {{B}} in that order (ABBA form, "
            "e.g. 'When {A} and {B} went to the store, {B} gave a drink to'); got "
            f"{', '.join('{' + s + '}' for s in slots) or 'no names'}")
    return "".join(out)


def _is_single_token_name(model: HookedModel, name: str) -> bool:
    """Whether ``" " + name`` is one token for the model's tokenizer."""
    return len(model.tokenizer.encode(" " + name, add_special_tokens=False)) == 1


# -- roles ------------------------------------------------------------------------------------
def _ioi_roles(model: HookedModel, form: str, names: tuple[str, str, str],
               fill: dict[str, str], order: str) -> list[str] | None:
    """Wang et al.'s roles of an IOI prompt: IO, S1, S1+1 (the token after S1), S2, END."""
    text, spans = format_spans(form, {"n0": names[0], "n1": names[1], "n2": names[2], **fill})
    first, second = ("IO", "S1") if order == "ABBA" else ("S1", "IO")
    roles = token_roles(model, text, [(*spans["n0"], first), (*spans["n1"], second),
                                      (*spans["n2"], "S2")])
    if roles is not None and "S1" in roles:
        after = max(i for i, r in enumerate(roles) if r == "S1") + 1
        if after < len(roles) and not roles[after]:
            roles[after] = "S1+1"
    return roles


# -- the dataset ------------------------------------------------------------------------------
class IOIDataset(PatchingDataset):
    """Indirect object identification pairs in the style of Wang et al. (2022).

    Clean: "When Mary and John went to the store, John gave a drink to" — ``correct`` is the
    indirect object " Mary", ``incorrect`` the subject " John". Corruptions:

    * ``"swap"``: the second subject mention (S2) becomes the other name ("..., Mary gave a
      drink to"), so the repeated name, and hence the right answer, flips;
    * ``"abc"``: all three name slots get three other distinct names, none from the clean
      prompt ("When Paul and Kate went to the store, Lucy gave a drink to").

    ``order="ABBA"`` mentions the indirect object first ("Mary and John ..., John"),
    ``"BABA"`` the subject first ("John and Mary ..., John"); ``"both"`` alternates, starting
    with ABBA. Names that are not one token with a leading space for the model's tokenizer are
    dropped (their number is ``dropped_names``); pairs whose clean and corrupted prompts would
    differ in token length are re-drawn (``dropped_pairs``). ``equal_length=True`` keeps every
    prompt at one token length and uses only the first template, so positions line up across
    pairs (for ``by_position`` sweeps).

    Args:
        model: gives the tokenizer.
        n: number of pairs.
        seed: ``random.Random(seed)`` draws templates, names, places and objects.
        templates: ABBA templates with ``{A}`` (indirect object), ``{B}`` (subject, twice) and
            optionally ``{place}``, ``{object}``; default :data:`IOI_TEMPLATES`.
        names: first names; default :data:`IOI_NAMES`. At least 3 (``"abc"``: 5) must be single
            tokens.
        corruption: ``"swap"`` or ``"abc"``.
        order: ``"both"``, ``"ABBA"`` or ``"BABA"``.

    Attributes (besides the :class:`PatchingDataset` lists, one entry per pair):
        orders: ``"ABBA"`` / ``"BABA"``.
        io_names, subject_names: the clean prompt's indirect object and subject.
        roles: one role per token of the clean prompt: ``"IO"``, ``"S1"``, ``"S1+1"``,
            ``"S2"``, ``"END"`` or ``""`` (Wang et al.'s names; see :func:`token_roles`).
        names: the single-token name pool used; dropped_names: how many were dropped.

    Example::

        ioi = IOIDataset(model, n=8, seed=0)
        ioi.clean[0], ioi.corrupted[0], ioi.orders[:2]    # ..., ['ABBA', 'BABA']
    """

    per_pair_fields: ClassVar[tuple[str, ...]] = ("orders", "io_names", "subject_names",
                                                   "roles")

    def __init__(self, model: HookedModel, n: int = 32, seed: int = 0,
                 templates: Sequence[str] | None = None, names: Sequence[str] | None = None,
                 corruption: str = "swap", order: str = "both",
                 equal_length: bool = False) -> None:
        check_n(n)
        if corruption not in ("swap", "abc"):
            raise InvalidArgumentError(f"corruption must be 'swap' or 'abc', got {corruption!r}")
        if order not in ("both", "ABBA", "BABA"):
            raise InvalidArgumentError(f"order must be 'both', 'ABBA' or 'BABA', got {order!r}")
        raw_templates = list(IOI_TEMPLATES if templates is None else templates)
        if not raw_templates:
            raise InvalidArgumentError("templates is empty: give at least one IOI template")
        forms = [_ioi_template(t) for t in raw_templates]
        if equal_length:
            forms = forms[:1]
        given = list(dict.fromkeys(IOI_NAMES if names is None else names))  # dedupe, keep order
        if not all(isinstance(x, str) and x.strip() for x in given):
            raise InvalidArgumentError("names must be non-empty strings")
        pool = [x.strip() for x in given if _is_single_token_name(model, x.strip())]
        self.names: list[str] = pool
        self.dropped_names: int = len(given) - len(pool)
        need = 5 if corruption == "abc" else 3
        if len(pool) < need:
            raise InvalidArgumentError(
                f"only {len(pool)} of {len(given)} names are single tokens (with a leading "
                f"space) for this tokenizer; IOI with corruption={corruption!r} needs at least "
                f"{need}: pass names= with more common first names")

        rng = random.Random(seed)
        clean: list[str] = []
        corrupted: list[str] = []
        correct: list[int] = []
        incorrect: list[int] = []
        orders: list[str] = []
        ios: list[str] = []
        subjects: list[str] = []
        roles: list[list[str] | None] = []
        target_len: int | None = None
        dropped_pairs = 0
        max_attempts = 100 * n + 100
        attempts = 0
        while len(clean) < n:
            attempts += 1
            if attempts > max_attempts:
                raise InvalidArgumentError(
                    f"could only build {len(clean)} of {n} IOI pairs with equal clean/corrupted "
                    "token lengths; try other names/templates or a smaller n")
            form = rng.choice(forms)
            fill = {"place": rng.choice(IOI_PLACES), "object": rng.choice(IOI_OBJECTS)}
            drawn = rng.sample(pool, need)
            io, s = drawn[0], drawn[1]
            this = order if order != "both" else ("ABBA" if len(clean) % 2 == 0 else "BABA")
            first, second = (io, s) if this == "ABBA" else (s, io)
            text = form.format(n0=first, n1=second, n2=s, **fill)
            if corruption == "swap":
                other = form.format(n0=first, n1=second, n2=io, **fill)
            else:
                other = form.format(n0=drawn[2], n1=drawn[3], n2=drawn[4], **fill)
            length = n_tokens(model, text)
            if length != n_tokens(model, other):
                dropped_pairs += 1
                continue
            if equal_length:
                target_len = length if target_len is None else target_len
                if length != target_len:
                    continue
            clean.append(text)
            corrupted.append(other)
            correct.append(model.to_single_token(" " + io))
            incorrect.append(model.to_single_token(" " + s))
            orders.append(this)
            ios.append(io)
            subjects.append(s)
            roles.append(_ioi_roles(model, form, (first, second, s), fill, this))
        self.orders, self.io_names, self.subject_names = orders, ios, subjects
        self.roles = roles
        self.dropped_pairs = dropped_pairs
        super().__init__(clean, corrupted, correct, incorrect, "logit_diff", {}, "ioi",
                         {"corruption": corruption, "order": order, "seed": seed,
                          "equal_length": equal_length}, model=model)
