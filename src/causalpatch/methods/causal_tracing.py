"""Causal tracing (Meng et al., 2022, "Locating and Editing Factual Associations in GPT").

Where does a model recall a fact about a subject? Corrupt the subject by adding Gaussian noise to
its token embeddings, so the model loses the fact, then restore one clean activation at a time
(one layer, one token position) and see how much of the answer's probability comes back.

* clean run: ``p_clean`` = probability of the answer token;
* corrupted run: noise ``N(0, (noise * sigma)^2)`` added to the embedding output at the subject
  positions, ``sigma`` = the standard deviation of the embedding outputs over the whole
  vocabulary (``noise_std="vocab"``, the default), over the traced subject tokens
  (``"subject"``, ROME's statistic) or a given number; ``p_corrupted`` = the answer's
  probability averaged over ``samples`` noise draws;
* restored run: the corrupted run with one component at one ``(layer, position)`` set to its
  clean value, the same noise draws; ``p_restored`` averaged over the draws.

The *indirect effect* is ``IE = p_restored - p_corrupted``. Components: ``resid_post`` (the
hidden state after layer L), ``mlp`` and ``attn`` (block outputs before the residual add; with
``window=w`` the ``w`` layers centred at L are restored together, as ROME's plots do with
``w=10``; ``window="scaled"`` keeps ROME's fraction of the depth, ``exclude_layers`` leaves
layers out of every window) and ``resid_pre``. ``sever="mlp"``/``"attn"`` adds ROME's severed
hidden-state traces: the hidden state restored with the MLP (attention) outputs of every later
layer at that position frozen at their corrupted values (frozen site patches of the same rows).

Aggregation. Per prompt, ROME's definition averages the answer's probability over the noise
draws (``p_corrupted``, ``p_restored``). Over prompts, every cell follows the one rule of
:mod:`causalpatch.assemble` with :attr:`~causalpatch.assemble.Scale.CHANGE` (base = the
corrupted run, source = the clean run): ``effect = mean over prompts of (p_restored -
p_corrupted)``, ``per_pair`` the per-prompt IE. With ROME's position groups the mean of a group
is taken over the prompts that *have* that group (a one-token subject has no middle tokens), as
in ROME's averaged figures; ``extra["group_counts"]`` says how many prompts contributed.

Computation (exact, up to float rounding), on the one staircase engine
(:func:`causalpatch.engine.staircase_logits`): each noise draw is a *base run* whose embedding
output is the clean one plus the draw's noise at the subject
(:func:`causalpatch.engine.run_perturbed`), the clean run is the *source*, and a restoration is a
*patch* (the site at the restored layers, one position). Every restoration and every noise draw
of one position ``p`` is a row of the same batches. A restoration at ``(L, p)`` leaves layers
before ``L`` and positions before ``p`` as in its draw's corrupted run, so each row enters the
decoder stack at its own layer with that run's residual stream and only positions ``p..T-1`` are
computed, with the keys/values of earlier positions from the run's own cache (Hugging Face's, so
sliding-window layers are exact too). Positions before the subject are never computed (their
effect is exactly 0), nor are restorations of the last layer at an earlier position; only the
last position is unembedded and each row keeps just the answer's probability
(``exp(logit - logsumexp)``, :func:`answer_prob`).

Example::

    from causalpatch import InterpretableModel, causal_tracing

    model = InterpretableModel("smollm2")
    result = causal_tracing(model, "The Eiffel Tower is located in the city of", "The Eiffel Tower",
                            position_groups=False)
    result["mlp"].effect_matrix.shape      # (30, 10): layer x position, IE of the answer
"""

from __future__ import annotations

import io
import json
import math
import os
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .._io import atomic_write_bytes, atomic_write_text
from ..assemble import (Aggregate, GroupValues, PairValues, Scale, aggregate, build_result,
                        progress_callback)
from ..engine import embed, run_perturbed, staircase_logits
from ..enums import Direction
from ..errors import InvalidArgumentError, InvalidTypeError, OutOfRangeError
from ..metrics import CI_N_BOOT, CI_SEED, bootstrap_interval, get_metric
from ..options import DEFAULT_MEMORY_MB, Progress, RunOptions
from ..plan import Patch, SitePatch, answer_tokens, check_int
from ..render.html import compact_html, report
from ..render.plots import plot_trace
from ..tokens import is_single_prompt, prepended_bos, token_lists

if TYPE_CHECKING:
    from ..model import HookedModel
    from ..names import Site
    from ..result import PatchingResult

#: ROME's position groups for averages over many facts (Meng et al., 2022, Fig. 2).
GROUPS: tuple[str, ...] = ("first subject token", "middle subject tokens", "last subject token",
                           "first subsequent token", "further tokens", "last token")
#: Components that can be restored.
TRACE_COMPONENTS: tuple[str, ...] = ("resid_pre", "resid_post", "mlp", "attn")
#: ``sever=`` kind -> the result's component: the hidden state restored with that kind's later
#: outputs at the restored position frozen at their corrupted values (ROME, Fig. 3).
SEVERED: dict[str, str] = {"mlp": "resid_post_sever_mlp", "attn": "resid_post_sever_attn"}
#: ``noise_std=`` rules besides a number: the embedding std over the whole vocabulary
#: (``"vocab"``, the default) or over the traced prompts' subject tokens (``"subject"``).
NOISE_STD_RULES: tuple[str, ...] = ("vocab", "subject")
#: ``window="scaled"``: ROME's 10 of GPT-2 XL's 48 layers, scaled to the model's depth.
ROME_WINDOW, ROME_DEPTH = 10, 48

#: The metric of every causal-tracing result: the answer's probability.
_PROB = get_metric("prob")

_EMBED_STD: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()


# -- helpers ---------------------------------------------------------------------------------------
def embedding_std(model: HookedModel, chunk: int = 8192) -> float:
    """Standard deviation of the embedding layer's output over every vocabulary entry.

    The output of the hooked ``embed`` module is used (so models that scale their embeddings
    inside the module, like Gemma, are measured at the scale the noise is added at). Cached
    per model.
    """
    hf = model.hf_model
    if hf in _EMBED_STD:
        return _EMBED_STD[hf]
    total, total_sq, count = 0.0, 0.0, 0
    with torch.no_grad():
        for lo in range(0, model.vocab_size, chunk):
            ids = torch.arange(lo, min(lo + chunk, model.vocab_size), device=model.device)
            out = embed(model, ids.unsqueeze(0)).double()
            total += float(out.sum())
            total_sq += float((out * out).sum())
            count += out.numel()
    mean = total / count
    std = math.sqrt(max(total_sq / count - mean * mean, 0.0) * count / max(count - 1, 1))
    _EMBED_STD[hf] = std
    return std


def _char_offsets(model: HookedModel, prompt: Any, ids: list[int]
                  ) -> tuple[str, list[tuple[int, int]]]:
    """The prompt text and each token's ``(start, end)`` character span in it."""
    tok = model.tokenizer
    if isinstance(prompt, str):
        try:
            enc = tok(prompt, return_offsets_mapping=True)
            if list(enc["input_ids"]) == list(ids):
                return prompt, [(int(o[0]), int(o[1])) for o in enc["offset_mapping"]]
        except Exception:  # slow tokenizers have no offsets: fall back to decoding
            pass
    text = tok.decode(ids)
    offsets: list[tuple[int, int]] = []
    prev = 0
    for k in range(1, len(ids) + 1):
        end = len(tok.decode(ids[:k]))
        if not text.startswith(tok.decode(ids[:k])):
            offsets = []
            break
        offsets.append((prev, end))
        prev = end
    if offsets:
        return text, offsets
    pieces = [tok.decode([t]) for t in ids]  # last resort: concatenated single-token strings
    text, offsets, pos = "", [], 0
    for piece in pieces:
        offsets.append((pos, pos + len(piece)))
        text += piece
        pos += len(piece)
    return text, offsets


def subject_span(model: HookedModel, prompt: Any, subject: str | tuple[int, int],
                 ids: list[int] | None = None) -> tuple[int, int]:
    """Token range ``[start, end)`` of ``subject`` (its first occurrence) in ``prompt``.

    Uses the tokenizer's character offsets when available, else the decoded tokens. A token
    that overlaps the subject's characters at all belongs to the span. ``subject`` may also be
    a ``(start, end)`` token range.

    Raises:
        InvalidArgumentError: the subject does not occur in the prompt (the message shows both
            and the prompt's tokens).
    """
    return _locate_subject(model, prompt, subject, ids)[0]


def _locate_subject(model: HookedModel, prompt: Any, subject: str | tuple[int, int],
                    ids: list[int] | None = None) -> tuple[tuple[int, int], int]:
    """:func:`subject_span` and how many times the subject occurs in the prompt's text
    (non-overlapping; 1 for a token range)."""
    ids = list(ids if ids is not None else token_lists(model, prompt, "prompt")[0])
    if isinstance(subject, (tuple, list)) and len(subject) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in subject):
        start, end = int(subject[0]), int(subject[1])
        if not 0 <= start < end <= len(ids):
            raise OutOfRangeError(
                f"subject token range {tuple(subject)} is outside the prompt's {len(ids)} tokens")
        return (start, end), 1
    if not isinstance(subject, str) or not subject.strip():
        raise InvalidTypeError(
            f"subject must be a non-empty string (or a (start, end) token range), got {subject!r}")
    text, offsets = _char_offsets(model, prompt, ids)
    c0 = text.find(subject)
    if c0 < 0:
        c0 = text.find(subject.strip())
        subject = subject.strip()
    span = [] if c0 < 0 else [i for i, (a, b) in enumerate(offsets)
                              if b > a and a < c0 + len(subject) and b > c0]
    if not span:
        tokens = [model.tokenizer.decode([t]) for t in ids]
        shown = prompt if isinstance(prompt, str) else text
        raise InvalidArgumentError(
            f"subject {subject!r} not found in prompt {shown!r} (tokens: {tokens}); the subject "
            "must appear in the prompt exactly as written")
    return (span[0], span[-1] + 1), text.count(subject)


def position_groups(n_tokens: int, span: tuple[int, int]) -> list[list[int]]:
    """Token positions of each of ROME's six :data:`GROUPS` for one prompt.

    first / middle / last subject token; the first token after the subject (unless it is the
    prompt's last token); further tokens (after that, before the last token); the last token.
    Groups may be empty (a one-token subject has no middle tokens) and the first and last
    subject token coincide for a one-token subject. Tokens before the subject belong to no
    group (their effect is exactly 0: noise only reaches later positions).
    """
    s0, s1 = span
    last = n_tokens - 1
    return [[s0], list(range(s0 + 1, s1 - 1)), [s1 - 1],
            [s1] if s1 < last else [], list(range(s1 + 1, last)), [last]]


def _window(layer: int, window: int, n_layers: int) -> range:
    """``window`` consecutive layers centred at ``layer``, clipped to the model."""
    return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))


def scaled_window(n_layers: int) -> int:
    """``window="scaled"``: ROME's window of 10 layers in GPT-2 XL's 48, scaled to a model of
    ``n_layers`` layers, ``max(1, round(n_layers * 10 / 48))`` (halves rounded up): 6 for
    SmolLM2-135M's 30 layers, 10 for 48."""
    return max(1, int(n_layers * ROME_WINDOW / ROME_DEPTH + 0.5))


def subject_std(model: HookedModel, ids_list: Sequence[Sequence[int]],
                spans: Sequence[tuple[int, int]]) -> float:
    """``noise_std="subject"``: the standard deviation of the embedding output at the subject
    tokens, pooled over every prompt (each subject token of each prompt once, every one of its
    ``d_model`` values; one mean, ``n - 1`` denominator).

    ROME's sigma is the same statistic over the subjects of its whole dataset, each subject
    tokenised alone; here it is the subject tokens exactly as they are noised in the prompts
    given (pass ``noise_std=<number>`` to use a std measured elsewhere, e.g.
    :func:`subject_embedding_std` over many facts).
    """
    values = []
    with torch.no_grad():
        for ids, (s0, s1) in zip(ids_list, spans):
            ids_t = torch.tensor([list(ids)], dtype=torch.long, device=model.device)
            values.append(embed(model, ids_t)[0, s0:s1].double().flatten().cpu())
    flat = torch.cat(values)
    if flat.numel() < 2:
        raise InvalidArgumentError(
            "noise_std='subject' needs at least two embedding values; the subject tokens give "
            f"{flat.numel()}")
    return float(flat.std())


def subject_embedding_std(model: HookedModel, prompts: Any,
                          subjects: str | tuple[int, int] | Sequence[str | tuple[int, int]],
                          prepend_bos: bool | int = False) -> float:
    """The std of :func:`subject_std` over ``prompts`` and their ``subjects`` (one for all or one
    per prompt): compute it over many facts once, then trace few with ``noise_std=`` it."""
    prompt_list = [prompts] if is_single_prompt(prompts) else list(prompts)
    subjects_ = _subjects(subject=subjects, n=len(prompt_list))
    ids_list, spans, _ = _located(model, prompt_list, subjects_, prepended_bos(model, prepend_bos))
    return subject_std(model, ids_list, spans)


def _subjects(subject: Any, n: int) -> list[Any]:
    """One subject per prompt (a string or a token range given once stands for all)."""
    if isinstance(subject, str) or (isinstance(subject, tuple) and len(subject) == 2
                                    and all(isinstance(v, int) for v in subject)):
        return [subject] * n
    subjects = list(subject)
    if len(subjects) != n:
        raise InvalidArgumentError(f"subject has {len(subjects)} entries for {n} prompts")
    return subjects


def _located(model: HookedModel, prompts: Sequence[Any], subjects: Sequence[Any],
             bos: int | None) -> tuple[list[list[int]], list[tuple[int, int]], list[int]]:
    """Every prompt's token ids (BOS in front when ``bos`` is given and the prompt does not
    start with it), subject span in those ids and subject occurrence count. Subjects are found
    in the prompt's own tokens (a token range counts them), then shifted past the BOS."""
    ids_list, spans, occurrences = [], [], []
    for p, sub in zip(prompts, subjects):
        ids = token_lists(model, p, "prompt")[0]
        (s0, s1), k = _locate_subject(model, p, sub, ids)
        if bos is not None and ids[0] != bos:
            ids, s0, s1 = [bos, *ids], s0 + 1, s1 + 1
        ids_list.append(ids)
        spans.append((s0, s1))
        occurrences.append(k)
    return ids_list, spans, occurrences


# -- one prompt ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Restoration:
    """One restoration of a position: the site ``site`` at the decoder layers ``layers`` (one
    layer, or the window centred at ``layer`` without the excluded layers), all at the same
    token position; result component ``kind``. ``frozen``: for a severed trace, the site kind
    (``mlp``/``attn``) held at its corrupted value at that position in every layer after
    ``layer``."""

    kind: str
    layer: int
    layers: tuple[int, ...]
    site: str
    frozen: str | None = None


def _restorations(kinds: Sequence[str], n_layers: int, window: int,
                  exclude: Sequence[int] = ()) -> list[_Restoration]:
    severed = {v: k for k, v in SEVERED.items()}
    out = []
    for kind in kinds:
        for layer in range(n_layers):
            if kind in severed:
                out.append(_Restoration(kind, layer, (layer,), "resid_post", severed[kind]))
            elif kind in ("resid_pre", "resid_post"):
                out.append(_Restoration(kind, layer, (layer,), kind))
            else:
                layers = tuple(x for x in _window(layer, window, n_layers) if x not in exclude)
                out.append(_Restoration(kind, layer, layers, kind))
    return out


def _no_op(r: _Restoration, p: int, n_tokens: int, n_layers: int) -> bool:
    """Restorations that cannot change the last position's logits (exactly the corrupted run):
    a window whose every layer is excluded, the last layer's output or block outputs at an
    earlier position."""
    if not r.layers:
        return True
    if p == n_tokens - 1 or r.site == "resid_pre":
        return False
    return min(r.layers) == n_layers - 1


def _patch(r: _Restoration, p: int, sites: Mapping[str, Site], n_layers: int) -> Patch:
    """The restoration ``r`` at position ``p``: the clean site values, plus (severed) the
    frozen kind's corrupted values at ``p`` in every later layer."""
    patch = [SitePatch(sites[f"blocks.{layer}.{r.site}"], (p,)) for layer in r.layers]
    if r.frozen is not None:
        patch += [SitePatch(sites[f"blocks.{later}.{r.frozen}"], (p,), frozen=True)
                  for later in range(r.layer + 1, n_layers)]
    return tuple(patch)


def answer_prob(logits: torch.Tensor, answer: int) -> torch.Tensor:
    """The answer's probability ``[rows, 1]`` from logits ``[rows, vocab]``: ``exp(logit[answer]
    - logsumexp(logits))``, without materialising the softmax."""
    logits = logits.float()
    return torch.exp(logits[:, answer] - torch.logsumexp(logits, -1)).unsqueeze(1)


@dataclass
class _Traced:
    """One prompt's trace (the evaluator's payload: JSON data, so a checkpoint keeps it)."""

    p_clean: float
    p_corrupted: float
    restored: dict[str, list[list[float]]]  # kind -> [n_layers][T] mean p over the noise draws
    answer: int

    def payload(self) -> dict[str, Any]:
        return {"p_clean": self.p_clean, "p_corrupted": self.p_corrupted,
                "restored": self.restored, "answer": self.answer}

    @classmethod
    def of(cls, payload: Mapping[str, Any]) -> _Traced:
        return cls(float(payload["p_clean"]), float(payload["p_corrupted"]),
                   {k: [list(map(float, row)) for row in v]
                    for k, v in payload["restored"].items()}, int(payload["answer"]))

    def restored_tensor(self, kind: str) -> torch.Tensor:
        """``[n_layers, T]`` the mean restored probability of ``kind``."""
        return torch.tensor(self.restored[kind], dtype=torch.float64).float()


def subject_noise(seed: int, n_samples: int, span: tuple[int, int], d_model: int,
                  sigma: float) -> torch.Tensor:
    """The noise draws of one prompt, ``[n_samples, n_subject_tokens, d_model]``: seeded, so a
    prompt's noise is the same in every run, on every worker and after a resume."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n_samples, span[1] - span[0], d_model, generator=gen) * sigma


def _trace_one(model: HookedModel, ids: list[int], span: tuple[int, int],
               answer: int | None, sigma: float, n_samples: int, seed: int,
               kinds: Sequence[str], restorations: Sequence[_Restoration],
               batch_size: int | None, memory_mb: float = DEFAULT_MEMORY_MB,
               stats: dict[str, Any] | None = None) -> _Traced:
    """Trace one prompt on the staircase engine: one base run per noise draw (the clean
    embeddings plus the draw's noise at the subject, :func:`~causalpatch.engine.run_perturbed`),
    the clean run as the source, every (restoration, position, draw) a patch row."""
    n, T = model.n_layers, len(ids)
    s0, s1 = span
    noise = subject_noise(seed, n_samples, span, model.d_model, sigma)
    ids_t = torch.tensor([ids], dtype=torch.long, device=model.device)
    noised = embed(model, ids_t).expand(n_samples, -1, -1).clone()  # [n_samples, T, d_model]
    noised[:, s0:s1] = noised[:, s0:s1] + noise.to(noised.device, noised.dtype)
    site_kinds = dict.fromkeys([r.site for r in restorations] +
                               [r.frozen for r in restorations if r.frozen is not None])
    sites = {f"blocks.{layer}.{k}": model.site(f"blocks.{layer}.{k}")
             for k in site_kinds for layer in range(n)}
    runs = run_perturbed(model, ids, noised, list(sites.values()))

    clean = torch.softmax(runs[0].source_last.float(), -1)
    answer = int(clean.argmax()) if answer is None else answer
    p_clean = float(clean[answer])

    def read(logits: torch.Tensor) -> torch.Tensor:
        return answer_prob(logits, answer)

    corrupted_rows = read(torch.stack([run.base_last for run in runs]))[:, 0]
    p_corrupted = float(corrupted_rows.mean())

    # rows: every restoration at every position from the subject on (earlier positions are
    # exactly the corrupted run: never computed, just filled), for every noise draw
    restored = {k: torch.full((n, T), p_corrupted) for k in kinds}
    cells: list[tuple[str, int, int]] = []
    jobs: list[tuple[int, Patch]] = []
    for p in range(s0, T):
        for r in restorations:
            if _no_op(r, p, T, n):
                continue
            patch = _patch(r, p, sites, n)
            cells.append((r.kind, r.layer, p))
            jobs += [(s, patch) for s in range(n_samples)]
    if jobs:
        probs = staircase_logits(model, runs, jobs, batch_size, memory_mb, stats=stats,
                                 readout=read)
        means = probs[:, 0].reshape(len(cells), n_samples).double().mean(1)
        for (kind, layer, p), value in zip(cells, means.tolist()):
            restored[kind][layer, p] = value
    return _Traced(p_clean, p_corrupted, {k: v.tolist() for k, v in restored.items()}, answer)


# -- result ----------------------------------------------------------------------------------------
class CausalTracingResult(dict):
    """Causal-tracing results: ``{component: PatchingResult}`` plus the per-prompt details.

    Each :class:`~causalpatch.result.PatchingResult` holds the indirect effect
    ``IE = p_restored - p_corrupted`` (metric ``"prob"``, not normalised), averaged over
    prompts, with axes ``("layer", "group")`` (ROME's six position groups) or
    ``("layer", "position")``.

    Attributes:
        prompts, subjects: as given (subjects as strings or token ranges).
        answers: answer token ids.
        spans: subject token ranges ``[start, end)``.
        tokens: each prompt's token strings.
        p_clean, p_corrupted: ``[n_prompts]`` answer probabilities.
        per_position: per prompt, ``{component: IE [n_layers, n_tokens]}``.
        noise: per prompt, the noise added ``[n_samples, n_subject_tokens, d_model]``.
        sigma: the noise standard deviation (``noise`` x the std ``noise_std`` chose).
        settings: the arguments of the run.
    """

    def __init__(self, results: Mapping[str, PatchingResult], **attrs: Any) -> None:
        super().__init__(results)
        self.prompts: list[Any] = attrs.get("prompts", [])
        self.subjects: list[Any] = attrs.get("subjects", [])
        self.answers: list[int] = attrs.get("answers", [])
        self.spans: list[tuple[int, int]] = attrs.get("spans", [])
        self.tokens: list[list[str]] = attrs.get("tokens", [])
        self.p_clean: torch.Tensor = attrs.get("p_clean", torch.empty(0))
        self.p_corrupted: torch.Tensor = attrs.get("p_corrupted", torch.empty(0))
        self.per_position: list[dict[str, torch.Tensor]] = attrs.get("per_position", [])
        self.noise: list[torch.Tensor] = attrs.get("noise", [])
        self.sigma: float = attrs.get("sigma", 0.0)
        self.settings: dict[str, Any] = attrs.get("settings", {})

    def __repr__(self) -> str:
        comps = ", ".join(f"{k}: {tuple(v.shape)}" for k, v in self.items())
        return (f"CausalTracingResult({len(self.prompts)} prompt(s), {comps}, "
                f"p_clean={float(self.p_clean.mean()):.3f}, "
                f"p_corrupted={float(self.p_corrupted.mean()):.3f})")

    def summary(self) -> str:
        """Baselines and, per component, the largest effects."""
        lines = [repr(self)]
        for kind, res in self.items():
            top = ", ".join(f"{idx}: {v:+.3f}" for idx, v in res.top_components(3, by="value"))
            lines.append(f"  {kind}: max IE {float(res.effect_matrix.max()):+.4f}; top {top}")
        return "\n".join(lines)

    def ci(self, component: str, level: float = 0.95, n_boot: int = 1000, seed: int = 0
           ) -> tuple[torch.Tensor, torch.Tensor]:
        """Bootstrap confidence interval of one component's indirect effects over the prompts.

        Prompts are resampled with replacement ``n_boot`` times and each cell's mean IE
        recomputed (:func:`causalpatch.metrics.bootstrap_interval`). Per-position results
        (``position_groups=False``) are :meth:`PatchingResult.ci` of ``self[component]``. With
        ROME's position groups a cell is averaged over the prompts that have its group, on each
        resample as in the result (a resample with none of them is left out); a group no prompt
        has gets NaN bounds.

        Returns:
            ``(lower, upper)``, float32 tensors shaped like ``self[component].effect_matrix``.

        Raises:
            InvalidArgumentError: an unknown component, or fewer than 2 prompts.
        """
        if component not in self:
            raise InvalidArgumentError(
                f"component must be one of {sorted(self)}, got {component!r}")
        result = self[component]
        if result.per_pair is not None or "group" not in result.axes:
            return result.ci(level=level, n_boot=n_boot, seed=seed)
        per_prompt = torch.full((len(self.per_position), *result.shape), math.nan)
        for i, (positions, span) in enumerate(zip(self.per_position, self.spans)):
            effect = positions[component]  # [n_layers, n_tokens]: this prompt's IE
            for g, columns in enumerate(position_groups(effect.shape[1], span)):
                if columns:
                    per_prompt[i, :, g] = effect[:, columns].mean(1)
        some = ~torch.isnan(per_prompt[:, 0, :]).all(0)  # [groups]: a prompt has the group
        lower = torch.full(result.shape, math.nan)
        upper = torch.full(result.shape, math.nan)
        lower[:, some], upper[:, some] = bootstrap_interval(
            per_prompt[:, :, some], level=level, n_boot=n_boot, seed=seed, skip_missing=True)
        return lower, upper

    def plot(self, component: str, ax: Any = None, title: str | None = None) -> Any:
        """ROME-style heatmap of one component: rows = positions/groups, columns = layers."""
        return plot_trace(self[component], ax=ax, title=title)

    def _title(self) -> str:
        n = len(self.prompts)
        return ("causalpatch: causal tracing of " +
                (repr(self.prompts[0]) if n == 1 else f"{n} prompts"))

    def to_html(self, path: str | os.PathLike[str] | None = None, title: str | None = None,
                plotly: str = "inline") -> str:
        """One interactive HTML report with a section per component (see
        :func:`causalpatch.render.html.report`); ``path`` (when given) is written atomically.
        Returns the HTML text."""
        return report(list(self.values()), path, title=title or self._title(), plotly=plotly)

    def save(self, path: str | os.PathLike[str], format: str | None = None) -> Path:
        """Save atomically, by ``format`` or the suffix: ``html`` (:meth:`to_html`), ``json``
        (every component's result, ``{component: PatchingResult JSON}``; with ROME's groups
        and several prompts each also gets ``"ci95"``, :meth:`ci` with ``CI_N_BOOT``
        resamples and ``CI_SEED``, ``null`` for a group no prompt has) or a figure
        (``png``/``svg``/``pdf``: the ROME-style heatmaps of every component side by side).

        Raises:
            InvalidArgumentError: any other format or suffix.
        """
        path = Path(path)
        kind = (format or path.suffix).lower().lstrip(".")
        if kind in ("html", "htm"):
            self.to_html(path)
        elif kind == "json":
            docs = {k: json.loads(v.to_json()) for k, v in self.items()}
            for k, doc in docs.items():
                if "ci95" not in doc and "group" in self[k].axes and len(self.per_position) > 1:
                    bounds = [[[None if x != x else x for x in row] for row in b.tolist()]
                              for b in self.ci(k, n_boot=CI_N_BOOT, seed=CI_SEED)]
                    doc["ci95"] = {"lower": bounds[0], "upper": bounds[1], "level": 0.95,
                                   "n_boot": CI_N_BOOT, "seed": CI_SEED}
            atomic_write_text(path, json.dumps(docs, allow_nan=False))
        elif kind in ("png", "svg", "pdf"):
            from ..render.figure import ResultFigure

            fig = ResultFigure(figsize=(6.5 * len(self), 4.5), layout="constrained")
            for i, kind_ in enumerate(self):
                plot_trace(self[kind_], ax=fig.add_subplot(1, len(self), i + 1))
            data = io.BytesIO()
            fig.savefig(data, format=kind, dpi=200)
            atomic_write_bytes(path, data.getvalue())
        else:
            raise InvalidArgumentError(
                f"cannot save a causal-tracing result as {kind!r}; use .html, .json, .png, "
                ".svg or .pdf")
        return path

    def _repr_html_(self) -> str:
        return "".join(compact_html(v) for v in self.values())


# -- public API ------------------------------------------------------------------------------------
def _cell_values(traced: _Traced, kinds: Sequence[str], ids: list[int], span: tuple[int, int],
                 grouped: bool) -> torch.Tensor:
    """One prompt's raw cells, component by component: ``p_restored`` per (layer, position),
    or its mean over each of ROME's groups (NaN where the prompt has no such group)."""
    if not grouped:
        return torch.cat([traced.restored_tensor(k).flatten() for k in kinds])
    groups = position_groups(len(ids), span)
    out = []
    for kind in kinds:
        restored = traced.restored_tensor(kind)
        cells = torch.full((restored.shape[0], len(GROUPS)), math.nan)
        for g, positions in enumerate(groups):
            if positions:
                cells[:, g] = restored[:, positions].mean(1)
        out.append(cells.flatten())
    return torch.cat(out)


def _by_group(values: PairValues, n_layers: int) -> tuple[Aggregate, list[int]]:
    """ROME's group averages: each ``(layer, group)`` cell by the one rule (``Scale.CHANGE``)
    over the prompts that have the group; the aggregate (no ``per_pair``) and the counts."""
    raw = values.raw.reshape(-1, n_layers, len(GROUPS))
    effect = torch.zeros(n_layers, len(GROUPS))
    std = torch.zeros(n_layers, len(GROUPS))
    counts = []
    for g in range(len(GROUPS)):
        have = (~torch.isnan(raw[:, 0, g])).nonzero().flatten()
        counts.append(len(have))
        if not len(have):
            continue
        sub = PairValues(raw[have, :, g], values.base[have],
                         None if values.source is None else values.source[have])
        agg = aggregate(sub, Scale.CHANGE, _PROB)
        effect[:, g] = agg.effect
        if agg.std is not None:
            std[:, g] = agg.std
    return Aggregate(effect.flatten(), torch.empty(0),
                     std.flatten() if raw.shape[0] > 1 else None), counts


@dataclass(frozen=True)
class _Plan:
    """A validated causal-tracing run: every prompt's tokens, subject span and answer."""

    prompts: list[Any]
    subjects: list[Any]
    ids: list[list[int]]
    spans: list[tuple[int, int]]
    occurrences: list[int]
    answers: list[int | None]
    kinds: tuple[str, ...]
    grouped: bool
    sigma: float
    window: int
    exclude: tuple[int, ...]
    bos: int | None
    restorations: list[_Restoration]

    @property
    def width(self) -> int:
        """Cells per layer: ROME's groups, or every position of the (equal-length) prompts."""
        return len(GROUPS) if self.grouped else len(self.ids[0])


def _plan(model: HookedModel, prompts: Any, subject: Any, answer: Any, noise: Any,
          samples: Any, window: Any, components: Sequence[str], position_groups: bool,
          noise_std: Any = "vocab", exclude_layers: Any = (), sever: Any = None,
          prepend_bos: Any = False) -> _Plan:
    """Validate everything before any forward pass (the embedding statistics aside)."""
    prompt_list = [prompts] if is_single_prompt(prompts) else list(prompts)
    if not prompt_list:
        raise InvalidArgumentError("prompts is empty: give at least one prompt")
    subjects = _subjects(subject, len(prompt_list))
    if isinstance(components, str):
        components = (components,)
    kinds = tuple(dict.fromkeys(components))
    bad = [k for k in kinds if k not in TRACE_COMPONENTS]
    if not kinds or bad:
        raise InvalidArgumentError(
            f"unknown components {bad or components!r}; expected some of {TRACE_COMPONENTS}")
    check_int(samples, "samples", 1)
    n_layers = model.n_layers
    if window == "scaled":
        window_ = scaled_window(n_layers)
    elif isinstance(window, str):
        raise InvalidArgumentError(
            f"window must be a positive int or 'scaled' (ROME's 10 of 48 layers scaled to the "
            f"model's depth: {scaled_window(n_layers)} here), got {window!r}")
    else:
        check_int(window, "window", 1)
        window_ = int(window)
    if not isinstance(noise, (int, float)) or isinstance(noise, bool) or not noise > 0:
        raise InvalidArgumentError(
            f"noise must be a positive number (a multiple of the embeddings' standard "
            f"deviation; ROME uses 3.0), got {noise!r}")
    if not (noise_std in NOISE_STD_RULES or (
            isinstance(noise_std, (int, float)) and not isinstance(noise_std, bool)
            and math.isfinite(noise_std) and noise_std > 0)):
        raise InvalidArgumentError(
            f"noise_std must be 'vocab' (the embedding std over the vocabulary, the default), "
            f"'subject' (over the traced subject tokens, ROME's) or a positive number (the std "
            f"itself), got {noise_std!r}")
    exclude = _exclude(exclude_layers, n_layers)
    severs = _severs(sever)
    bos = prepended_bos(model, prepend_bos)
    ids_list, spans, occurrences = _located(model, prompt_list, subjects, bos)
    answers = answer_tokens(model, answer, len(prompt_list), "answer")
    grouped = bool(position_groups)
    if not grouped and len({len(ids) for ids in ids_list}) > 1:
        raise InvalidArgumentError(
            "position_groups=False needs prompts of equal token length (got lengths "
            f"{sorted({len(i) for i in ids_list})}); use position_groups=True to average ROME's "
            "position groups")
    kinds = kinds + tuple(SEVERED[k] for k in severs)
    if noise_std == "vocab":
        std = embedding_std(model)
    elif noise_std == "subject":
        std = subject_std(model, ids_list, spans)
    else:
        std = float(noise_std)
    return _Plan(prompt_list, subjects, ids_list, spans, occurrences, answers, kinds, grouped,
                 float(noise) * std, window_, exclude, bos,
                 _restorations(kinds, n_layers, window_, exclude))


def _exclude(exclude_layers: Any, n_layers: int) -> tuple[int, ...]:
    """The layers left out of every ``mlp``/``attn`` restoration window, validated."""
    if exclude_layers is None:
        return ()
    listed = [exclude_layers] if isinstance(exclude_layers, int) else exclude_layers
    try:
        layers = list(listed)
    except TypeError:
        layers = [exclude_layers]
    for x in layers:
        if not isinstance(x, int) or isinstance(x, bool) or not 0 <= x < n_layers:
            raise InvalidArgumentError(
                f"exclude_layers must hold layer indices in [0, {n_layers - 1}] (e.g. (0,) to "
                f"keep MLP 0 out of every window), got {exclude_layers!r}")
    if len(set(layers)) >= n_layers:
        raise InvalidArgumentError(
            f"exclude_layers={exclude_layers!r} excludes all {n_layers} layers: no window "
            "would restore anything")
    return tuple(sorted(set(layers)))


def _severs(sever: Any) -> tuple[str, ...]:
    """The ``sever=`` kinds (``"mlp"``, ``"attn"``), validated."""
    if sever is None:
        return ()
    listed = [sever] if isinstance(sever, str) else sever
    try:
        kinds = tuple(dict.fromkeys(listed))
    except TypeError:
        kinds = (sever,)
    if not kinds or any(k not in SEVERED for k in kinds):
        raise InvalidArgumentError(
            f"sever must be 'mlp', 'attn' or both (('mlp', 'attn')), got {sever!r}; it adds "
            f"the hidden-state trace with those outputs frozen ({', '.join(SEVERED.values())})")
    return kinds


def _component_result(model: HookedModel, plan: _Plan, kind: str, values: PairValues,
                      traced: Sequence[_Traced], settings: dict[str, Any], t0: float,
                      t_setup: float) -> PatchingResult:
    """One component's :class:`PatchingResult` (``values``: its columns of the run)."""
    n, width = model.n_layers, plan.width
    extra: dict[str, Any] = {
        "n_prompts": len(traced), "noise": float(settings["noise"]), "sigma": plan.sigma,
        "noise_std": settings["noise_std"], "samples": settings["samples"],
        "seed": settings["seed"], "window": plan.window if kind in ("mlp", "attn") else 1,
        "exclude_layers": list(plan.exclude) if kind in ("mlp", "attn") else [],
        "sever": next((k for k, v in SEVERED.items() if v == kind), None),
        "prepend_bos": plan.bos, "subject_starts": [s0 for s0, _ in plan.spans],
        "subject_spans": [list(s) for s in plan.spans], "answers": [t.answer for t in traced],
        "subjects": [s if isinstance(s, str) else list(s) for s in plan.subjects],
        "subject_occurrences": plan.occurrences,
        "engine": {k: v for k, v in values.stats.items() if k != "executor"}}
    repeated = [i for i, k in enumerate(plan.occurrences) if k > 1]
    if repeated:
        extra["subject_note"] = "; ".join(
            f"prompt {i}: subject {plan.subjects[i]!r} occurs {plan.occurrences[i]} times, the "
            f"first occurrence (tokens {plan.spans[i][0]}..{plan.spans[i][1] - 1}) is traced"
            for i in repeated)
    labels: dict[str, list[Any]] = {"layer": list(range(n))}
    aggregated = None
    if plan.grouped:  # ROME's groups: averaged over the prompts that have them
        axes: tuple[str, ...] = ("layer", "group")
        labels["group"] = list(GROUPS)
        aggregated, extra["group_counts"] = _by_group(values, n)
    else:
        axes = ("layer", "position")
        s0, s1 = plan.spans[0]
        labels["position"] = [f"{j}: {tok!r}{'*' if s0 <= j < s1 else ''}"
                              for j, tok in enumerate(model.to_str_tokens(plan.ids[0]))]
        extra["positions"] = list(range(width))
    return build_result(
        model, values=values, scale=Scale.CHANGE, metric=_PROB, axes=axes, labels=labels,
        shape=(n, width), component=kind, method="causal_tracing",
        direction=Direction.DENOISE, clean=plan.ids, corrupted=[],
        answers=[[t.answer] for t in traced], timings={"setup_s": t_setup}, extra=extra,
        t_start=t0, aggregated=aggregated,
        clean_prompts=[p if isinstance(p, str) else model.tokenizer.decode(ids)
                       for p, ids in zip(plan.prompts, plan.ids)])


def causal_tracing(
    model: HookedModel,
    prompts: Any,
    subject: str | tuple[int, int] | Sequence[str | tuple[int, int]],
    *,
    answer: Any = None,
    noise: float = 3.0,
    samples: int = 10,
    seed: int = 0,
    components: Sequence[str] = ("resid_post", "mlp", "attn"),
    window: int | str = 10,
    position_groups: bool = True,
    noise_std: str | float = "vocab",
    exclude_layers: Sequence[int] = (),
    sever: str | Sequence[str] | None = None,
    prepend_bos: bool | int = False,
    batch_size: int | None = None,
    memory_mb: float = DEFAULT_MEMORY_MB,
    checkpoint: str | None = None,
    progress: Progress = None,
    executor: Any = None,
    threads: int | None = None,
) -> CausalTracingResult:
    """ROME-style causal tracing of one prompt or many.

    Args:
        model: the model (:class:`~causalpatch.InterpretableModel` or
            :class:`~causalpatch.HookedModel`).
        prompts: a prompt (string or token ids) or a list of them.
        subject: the subject string in each prompt (one for all, or one per prompt), or a
            ``(start, end)`` token range.
        answer: the answer token (string or id), one or one per prompt; default: the model's
            top-1 next token on the clean prompt.
        noise: noise scale as a multiple of ``noise_std`` (ROME: 3): the noise is
            ``N(0, (noise * std)^2)``.
        samples: noise draws per prompt (rows of each batch; ROME: 10).
        seed: noise seed; prompt ``i`` uses ``seed + i``. Every restoration sees the same draws.
        components: any of ``resid_post``, ``mlp``, ``attn``, ``resid_pre``.
        window: for ``mlp``/``attn``, restore ``window`` consecutive layers centred at L
            (clipped at the ends); ROME uses 10 (of GPT-2 XL's 48 layers). ``"scaled"``: the
            same fraction of this model's depth, :func:`scaled_window` (6 of 30 layers).
        position_groups: average positions into ROME's six groups (result axes
            ``("layer", "group")``, shape ``(n_layers, 6)``); False keeps every position (axes
            ``("layer", "position")``, shape ``(n_layers, n_tokens)``; prompts must then have
            equal token lengths).
        noise_std: the std the noise scales: ``"vocab"`` (default) the embedding output's std
            over the whole vocabulary (:func:`embedding_std`); ``"subject"`` its std over the
            subject tokens of the prompts traced (:func:`subject_std`, ROME's statistic); or a
            positive number, the std itself.
        exclude_layers: layers left out of every ``mlp``/``attn`` window (e.g. ``(0,)``: MLP 0
            acts like part of the embedding); a window left empty restores nothing (IE 0).
            Hidden-state restorations are unaffected.
        sever: ``"mlp"``, ``"attn"`` or both: add the hidden-state trace with the MLP
            (attention) outputs of every later layer at the restored position frozen at their
            corrupted values (ROME, Fig. 3), as components ``resid_post_sever_mlp`` /
            ``resid_post_sever_attn``, on the same noise draws.
        prepend_bos: put the tokenizer's BOS token (``True``) or the given token id in front
            of every prompt that does not start with it (SmolLM2's tokenizer adds none).
            Subject token ranges count the prompt's own tokens.
        batch_size: patch rows per staircase pass (default: as many as ``memory_mb`` holds;
            every noise draw's rows of a position share the passes).
        memory_mb, checkpoint, progress, executor, threads: the run options every method shares
            (:mod:`causalpatch.options`): a checkpoint keeps every finished prompt, a rerun
            traces only the others; with an executor, prompts are split into shards traced by
            Ray workers (same noise draws, same results). The progress bar counts prompts.

    Returns:
        :class:`CausalTracingResult`: ``result["mlp"]`` etc. are
        :class:`~causalpatch.result.PatchingResult` with ``method="causal_tracing"``,
        ``metric="prob"``, ``normalized=False`` and the indirect effect averaged over prompts
        (module docstring: the one rule, ``Scale.CHANGE``; ROME's groups are averaged over the
        prompts that have them).

    Raises:
        InvalidArgumentError: subject not in a prompt, unknown component, bad settings.
    """
    t0 = time.perf_counter()
    # -- validate everything first ----------------------------------------------------------
    options = RunOptions.make(model, progress=progress, executor=executor, batch_size=batch_size,
                              memory_mb=memory_mb, checkpoint=checkpoint, threads=threads)
    plan = _plan(model, prompts, subject, answer, noise, samples, window, components,
                 position_groups, noise_std, exclude_layers, sever, prepend_bos)
    n, kinds, width = model.n_layers, plan.kinds, plan.width
    n_cells = len(kinds) * n * width
    settings = {"noise": noise, "samples": samples, "seed": seed, "components": kinds,
                "window": plan.window, "position_groups": plan.grouped,
                "noise_std": noise_std, "exclude_layers": plan.exclude,
                "sever": [k for k, v in SEVERED.items() if v in kinds],
                "prepend_bos": plan.bos}
    t_setup = time.perf_counter() - t0

    # -- run: one prompt per group ------------------------------------------------------------
    def build(model_: HookedModel, stats: dict[str, Any]) -> Callable[..., GroupValues]:
        return partial(evaluate, model_, stats)

    def evaluate(model_: HookedModel, stats: dict[str, Any], group: list[int], cells: list[int],
                 tick_: Callable[[int], None] | None) -> GroupValues:
        (i,) = group
        one = _trace_one(model_, plan.ids[i], plan.spans[i], plan.answers[i], plan.sigma,
                         samples, seed + i, kinds, plan.restorations, options.batch_size,
                         options.memory_mb, stats)
        raw = _cell_values(one, kinds, plan.ids[i], plan.spans[i], plan.grouped)
        if tick_ is not None:
            tick_(len(cells))
        return GroupValues(torch.tensor([one.p_corrupted]), torch.tensor([one.p_clean]),
                           raw[cells].unsqueeze(0), payload=one.payload())

    # prompts are the pairs of this method: the checkpoint's fingerprint holds their tokens
    items = [_PromptItem(ids, a) for ids, a in zip(plan.ids, plan.answers)]
    tick, close = progress_callback(options.progress, len(items), "causal tracing")
    shown = [0]

    def prompts_done(done: int, total: int) -> None:  # run_pairs counts cells; show prompts
        assert tick is not None
        while shown[0] < done // max(1, n_cells):
            shown[0] += 1
            tick(1)

    counted = RunOptions(prompts_done if tick is not None else False, options.executor,
                         options.batch_size, options.memory_mb, options.checkpoint,
                         options.threads)
    try:
        values = counted.run(  # a prompt is traced whole: one call per prompt (chunk)
            model, items, n_cells, build, label="causal tracing", chunk=max(1, n_cells),
            checkpoint_args=dict(method="causal_tracing", spans=plan.spans, noise=noise,
                                 samples=samples, seed=seed, components=kinds,
                                 window=plan.window, grouped=plan.grouped, sigma=plan.sigma,
                                 exclude=plan.exclude))
    finally:
        close()
    traced = [_Traced.of(values.payloads[i]) for i in range(len(items))]

    # -- one result per component -------------------------------------------------------------
    results: dict[str, PatchingResult] = {}
    for c, kind in enumerate(kinds):
        part = PairValues(values.raw[:, c * n * width : (c + 1) * n * width], values.base,
                          values.source, stats=values.stats, seconds=values.seconds)
        results[kind] = _component_result(model, plan, kind, part, traced, settings, t0,
                                           t_setup)
    return CausalTracingResult(
        results, prompts=plan.prompts, subjects=plan.subjects,
        answers=[t.answer for t in traced], spans=plan.spans,
        tokens=[model.to_str_tokens(ids) for ids in plan.ids], p_clean=values.source,
        p_corrupted=values.base,
        per_position=[{k: t.restored_tensor(k) - t.p_corrupted for k in kinds} for t in traced],
        noise=[subject_noise(seed + i, samples, span, model.d_model, plan.sigma)
               for i, span in enumerate(plan.spans)],
        sigma=plan.sigma, settings=settings)


@dataclass(frozen=True)
class _PromptItem:
    """A traced prompt as the one method loop sees a pair (its checkpoint fingerprint reads
    ``clean``, ``corrupted``, ``correct``, ``incorrect``)."""

    clean: list[int]
    correct: int | None
    corrupted: tuple[()] = ()
    incorrect: None = None


def causal_tracing_dataset(
    model: HookedModel,
    facts: Sequence[Any] | None = None,
    n: int = 100,
    *,
    noise: float = 3.0,
    samples: int = 10,
    seed: int = 0,
    components: Sequence[str] = ("resid_post", "mlp", "attn"),
    window: int | str = 10,
    noise_std: str | float = "vocab",
    exclude_layers: Sequence[int] = (),
    sever: str | Sequence[str] | None = None,
    prepend_bos: bool | int = False,
    batch_size: int | None = None,
    memory_mb: float = DEFAULT_MEMORY_MB,
    checkpoint: str | None = None,
    progress: Progress = None,
    executor: Any = None,
    threads: int | None = None,
) -> CausalTracingResult:
    """Average causal tracing over many facts, in ROME's six position groups.

    Args:
        facts: :class:`~causalpatch.datasets.KnownFact` tuples, dicts with ``prompt``,
            ``subject`` and optionally ``answer`` (token id or string; default: the model's
            top-1 token), or ``(prompt, subject[, answer])`` tuples. Default:
            ``causalpatch.datasets.known_facts(model, n, seed=seed, prepend_bos=prepend_bos)``,
            i.e. ``n`` of ROME's known facts that the model completes correctly (with the BOS
            in front when it is prepended).
        n: number of facts when ``facts`` is None.
        Other arguments: as :func:`causal_tracing`.

    Returns:
        :class:`CausalTracingResult` whose components have shape ``(n_layers, 6)``, axes
        ``("layer", "group")``; ``extra["group_counts"]`` says how many facts have each group.
    """
    if facts is None:
        from ..datasets import known_facts

        fact_list: list[Any] = list(known_facts(model, n, seed=seed, prepend_bos=prepend_bos))
    else:
        fact_list = list(facts)
    if not fact_list:
        raise InvalidArgumentError("facts is empty")
    prompts, subjects, answers = [], [], []
    for i, fact in enumerate(fact_list):
        prompt, subject, answer = _fact_fields(fact, i)
        prompts.append(prompt)
        subjects.append(subject)
        answers.append(answer)
    return causal_tracing(
        model, prompts, subjects, answer=answers, noise=noise, samples=samples, seed=seed,
        components=components, window=window, position_groups=True, noise_std=noise_std,
        exclude_layers=exclude_layers, sever=sever, prepend_bos=prepend_bos,
        batch_size=batch_size,
        memory_mb=memory_mb, checkpoint=checkpoint, progress=progress, executor=executor,
        threads=threads)


def _fact_fields(fact: Any, i: int) -> tuple[Any, Any, Any]:
    """``(prompt, subject, answer or None)`` of a dict, a :class:`KnownFact` or a tuple."""
    if isinstance(fact, Mapping):
        if "prompt" in fact and "subject" in fact:
            answer = fact.get("answer", fact.get("attribute_token"))
            return fact["prompt"], fact["subject"], answer
    elif hasattr(fact, "prompt") and hasattr(fact, "subject"):
        answer = getattr(fact, "attribute_token", getattr(fact, "answer", None))
        return fact.prompt, fact.subject, answer
    elif isinstance(fact, (tuple, list)) and len(fact) in (2, 3):
        return fact[0], fact[1], fact[2] if len(fact) == 3 else None
    raise InvalidArgumentError(
        f"facts[{i}] must be a dict with 'prompt' and 'subject' keys (and optionally 'answer'), "
        f"a KnownFact or a (prompt, subject[, answer]) tuple; got {fact!r}")


__all__ = ["GROUPS", "NOISE_STD_RULES", "SEVERED", "TRACE_COMPONENTS", "CausalTracingResult",
           "causal_tracing", "causal_tracing_dataset", "embedding_std", "plot_trace",
           "position_groups", "scaled_window", "subject_embedding_std", "subject_span",
           "subject_std"]
