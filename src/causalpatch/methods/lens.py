"""Logit lens and direct logit attribution: what the residual stream says about the next token.

**Logit lens** (:func:`logit_lens`). After every decoder layer ``L`` the residual stream
``resid_post[L]`` is read out as if it were the last one: the model's own final norm is applied
to it *with that vector's own statistics* (its own RMS, or mean and variance for LayerNorm),
then the unembedding (and, on Gemma 2/3, the final logit soft-cap). The last layer's lens is
therefore the model's logits (tested to 1e-4 on every family). One forward pass reads every
layer; the lens is computed from the cached residuals, for every layer x position, with the
top-k tokens, the answer's probability and rank, the entropy, and the KL divergence
``KL(final || layer)`` from the final distribution to the layer's.

**Direct logit attribution** (:func:`direct_logit_attribution`). The final residual stream is
a sum of writes: the embeddings, every attention output and every MLP output (per head and per
neuron, with their output projection's bias, where asked). The final norm is frozen at the
clean run's statistics (its scale ``1/rms`` or ``1/std`` of the *actual* final residual, and
LayerNorm's centring), which makes the readout linear; each write projected through that frozen
norm and the unembedding onto the answer direction is its part, and the parts (plus the final
norm's bias and the unembedding's bias) sum exactly to the model's own logit difference.
Families whose blocks are normalised before the residual add (Gemma 2/3) have their post-block
norms frozen the same way for the per-head and per-neuron split. On models with a final logit
soft-cap (Gemma 2/3) the attributed quantity is the *pre-cap* logit difference
(``result.logit_diff``); the capped one the model outputs is ``result.model_logit_diff``.

Sign conventions: ``logit_diff = logit(correct) - logit(incorrect)`` at the chosen position
(default: each prompt's last token); a part is ``write . d`` where ``d`` is the frozen final
norm pulled back onto ``W_U[:, correct] - W_U[:, incorrect]``: positive parts push towards
the correct answer. Without ``incorrect`` the target is ``logit(correct)``.

Example::

    from causalpatch import InterpretableModel, logit_lens, direct_logit_attribution
    model = InterpretableModel("smollm2")
    lens = logit_lens(model, "The Eiffel Tower is in the city of", answer=" Paris")
    lens.logits.shape                     # [30, 9, 49152]: layer x position x vocab
    lens.answer_rank[:, -1]               # the rank of ' Paris' after every layer
    dla = direct_logit_attribution(model, "When Mary and John went to the store, John gave "
                                   "a drink to", unit="head", correct=" Mary", incorrect=" John")
    dla.top(5); sum(dla.parts.values()), dla.logit_diff   # equal
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .._io import atomic_write_text
from ..errors import (
    CorruptResultError,
    InvalidArgumentError,
    InvalidTypeError,
    OutOfRangeError,
)
from ..hooks import Hook, hooked
from ..options import check_threads, using_threads
from ..plan import answer_tokens
from ..tokens import Batch, is_single_prompt, make_batch, token_lists

if TYPE_CHECKING:
    from ..model import HookedModel

#: With ``keep_logits=False``, lens cells (layer x position) unembedded at once: bounds the
#: memory to about ``LENS_BLOCK_CELLS * vocab * 4`` bytes (with ``keep_logits=True`` the logits
#: of every cell are kept anyway and are computed by one matrix product).
LENS_BLOCK_CELLS = 2048
#: Bytes of logits whose statistics are computed together: small enough to stay in the CPU
#: cache between the few passes each row needs (about 2.5x faster than whole-tensor passes).
STATS_CHUNK_BYTES = 1 << 21
#: The units of :func:`direct_logit_attribution`.
UNITS = ("component", "layer", "head", "neuron")
#: Statistics :meth:`LensResult.plot` draws.
LENS_STATS = ("top", "answer_prob", "answer_rank", "entropy", "kl")
LENS_FORMAT, DLA_FORMAT, FORMAT_VERSION = "causalpatch-lens", "causalpatch-dla", 1


# -- shared input checks (all before any forward pass) -------------------------------------------
def _answers(model: HookedModel, value: Any, n: int, what: str) -> list[int] | None:
    """One answer id per prompt (:func:`~causalpatch.plan.answer_tokens`); ``None`` stays
    ``None``."""
    if value is None:
        return None
    tokens = answer_tokens(model, value, n, what)
    out = [t for t in tokens if t is not None]
    if len(out) != n:
        raise InvalidTypeError(
            f"{what} must be a single-token string like ' Paris' or a token id, got None")
    return out


def _position(p: Any, length: int, what: str, row: int) -> int:
    if isinstance(p, bool) or not isinstance(p, int):
        raise InvalidTypeError(f"{what} must be an int (negative counts from the end), got {p!r}")
    if not -length <= p < length:
        raise OutOfRangeError(
            f"{what}={p} is beyond prompt {row}, which has {length} tokens: it must be in "
            f"[{-length}, {length - 1}]")
    return p % length


def _decoder(model: HookedModel):
    memo: dict[int, str] = {}

    def decode(token: int) -> str:
        if token not in memo:
            memo[token] = model.tokenizer.decode([token])
        return memo[token]

    return decode


def _read(model: HookedModel, batch: Batch, names: Sequence[str], rows: torch.Tensor,
          cols: torch.Tensor, full_logits: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One forward pass of ``batch`` reading ``names`` at the cells ``(rows[i], cols[i])``:
    ``({name: [cells, ...]}, logits)``; logits are ``[batch, pos, vocab]`` with
    ``full_logits``, else the last column only (the model's unembedding then runs on one
    position)."""
    got: dict[str, torch.Tensor] = {}

    def reader(name: str):
        def read(act: torch.Tensor) -> None:
            act = act.detach()
            if act.shape[0] != batch.input_ids.shape[0]:  # broadcast rows (position embeddings)
                act = act.expand(batch.input_ids.shape[0], *act.shape[1:])
            got[name] = act[rows.to(act.device), cols.to(act.device)]

        return read

    hooks = [Hook(model.site(name), reader(name)) for name in names]
    mask = batch.attention_mask if batch.padded else None
    with torch.no_grad(), hooked(model.hf_model, hooks, model.dims):
        logits, _ = model.runtime.forward(batch.input_ids, attention_mask=mask,
                                          last_only=not full_logits)
    return got, logits


def _check_choice(value: Any, choices: Sequence[str], what: str) -> str:
    if not isinstance(value, str) or value not in choices:
        raise InvalidArgumentError(f"{what} must be one of {', '.join(map(repr, choices))}; "
                                   f"got {value!r}")
    return value


def _write_json(text: str, path: str | os.PathLike[str] | None) -> str:
    if path is not None:
        atomic_write_text(path, text)
    return text


def _load_json(text_or_path: str | bytes | os.PathLike[str], fmt: str) -> dict[str, Any]:
    raw: Any = text_or_path
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8")
    if isinstance(raw, os.PathLike) or (isinstance(raw, str) and not raw.lstrip().startswith("{")):
        raw = Path(raw).read_text(encoding="utf-8")
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CorruptResultError(f"not a {fmt} JSON file: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != fmt:
        raise CorruptResultError(f"not a {fmt} file (format field is "
                                 f"{data.get('format') if isinstance(data, dict) else None!r})")
    if data.get("version") != FORMAT_VERSION:
        raise CorruptResultError(f"{fmt} version {data.get('version')!r} is not supported "
                                 f"(this causalpatch reads version {FORMAT_VERSION})")
    return data


def _save(result: Any, path: str | os.PathLike[str], format: str | None, **plot_kw: Any) -> Path:
    """``.json``, ``.html`` or a figure (``.png``/``.svg``/``.pdf``), by suffix or ``format``."""
    path = Path(path)
    kind = (format or path.suffix.lstrip(".")).lower().lstrip(".")
    if kind == "json":
        result.to_json(path)
    elif kind in ("html", "htm"):
        result.to_html(path)
    else:
        from ..render.figure import figure_format, save_figure

        chosen = figure_format(path, format)
        fig = result.plot(**plot_kw)
        save_figure(fig, path, chosen)
    return path


# -- logit lens --------------------------------------------------------------------------------
@dataclass(eq=False)
class LensResult:
    """The logit lens of one prompt: every layer x position read out through the final norm
    and the unembedding.

    Attributes:
        prompt: the prompt (text, or its decoded tokens when ids were given).
        tokens: the token strings of the whole prompt.
        positions: the token positions of the position axis (absolute, ascending).
        layers: the layer axis: ``0 .. n_layers-1`` (``resid_post`` of that layer), preceded by
            ``"embed"`` (the input of layer 0) with ``include_embed=True``.
        logits: ``[n_layers, n_positions, vocab]`` float32 lens logits (soft-capped like the
            model's on Gemma 2/3), or ``None`` with ``keep_logits=False`` or after a JSON round
            trip. The last row equals the model's logits.
        top_ids, top_probs: ``[n_layers, n_positions, k]`` the ``k`` most likely tokens.
        top_tokens: their strings, ``[layer][position][k]``.
        entropy: ``[n_layers, n_positions]`` entropy of the lens distribution, in nats.
        kl: ``[n_layers, n_positions]`` ``KL(final || layer)`` in nats: from the model's output
            distribution at that position to the layer's (0 on the last layer).
        answer, answer_text: the answer token, if one was given.
        answer_prob, answer_logit: ``[n_layers, n_positions]`` its probability and logit.
        answer_rank: ``[n_layers, n_positions]`` its rank, 1 = the most likely token (ties:
            1 + the number of tokens with a strictly larger logit).
        model_name: the model's name.
    """

    prompt: str
    tokens: list[str]
    positions: list[int]
    layers: list[Any]
    top_ids: torch.Tensor
    top_probs: torch.Tensor
    top_tokens: list[list[list[str]]]
    entropy: torch.Tensor
    kl: torch.Tensor
    logits: torch.Tensor | None = None
    answer: int | None = None
    answer_text: str | None = None
    answer_prob: torch.Tensor | None = None
    answer_logit: torch.Tensor | None = None
    answer_rank: torch.Tensor | None = None
    model_name: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        ans = f", answer={self.answer_text!r}" if self.answer is not None else ""
        return (f"LensResult({self.model_name!r}, layers={len(self.layers)}, "
                f"positions={len(self.positions)}, k={self.k}{ans})")

    @property
    def k(self) -> int:
        return int(self.top_ids.shape[-1])

    @property
    def shape(self) -> tuple[int, int]:
        """``(n_layers, n_positions)`` of the statistics."""
        return (len(self.layers), len(self.positions))

    def position_labels(self) -> list[str]:
        """``"5: ' John'"`` per entry of the position axis."""
        return [f"{p}: {self.tokens[p]!r}" for p in self.positions]

    def cell(self, layer: Any, position: int = -1) -> list[tuple[str, float]]:
        """The top-k ``(token, probability)`` at ``layer`` (a label of :attr:`layers`; ints may
        be negative) and ``position`` (an entry of :attr:`positions`; negative counts from the
        end of the prompt)."""
        i = self._layer_index(layer)
        j = self._position_index(position)
        return [(self.top_tokens[i][j][r], float(self.top_probs[i, j, r]))
                for r in range(self.k)]

    def _layer_index(self, layer: Any) -> int:
        """Index on the layer axis of a layer label; a negative int counts layers from the
        last (``-1`` is the last layer)."""
        if isinstance(layer, int) and not isinstance(layer, bool) and layer < 0:
            numeric = [x for x in self.layers if isinstance(x, int)]
            if -len(numeric) <= layer:
                return self.layers.index(numeric[layer])
        elif not isinstance(layer, bool) and layer in self.layers:
            return self.layers.index(layer)
        raise OutOfRangeError(f"layer {layer!r} is not on the lens's layer axis {self.layers}")

    def _position_index(self, position: int) -> int:
        n = len(self.tokens)
        if isinstance(position, bool) or not isinstance(position, int) \
                or not -n <= position < n or position % n not in self.positions:
            raise OutOfRangeError(
                f"position {position!r} is not on the lens's position axis {self.positions}")
        return self.positions.index(position % n)

    def summary(self) -> str:
        """The top token of every layer at the last position of the axis, in words."""
        j = len(self.positions) - 1
        lines = [f"logit lens of {self.model_name or 'the model'} at position "
                 f"{self.position_labels()[j]}"]
        for i, layer in enumerate(self.layers):
            top = self.top_tokens[i][j][0]
            line = f"  layer {layer!s:>5}: {top!r} p={float(self.top_probs[i, j, 0]):.3f}"
            if self.answer_prob is not None and self.answer_rank is not None:
                line += (f"  {self.answer_text!r} p={float(self.answer_prob[i, j]):.3f} "
                         f"rank={int(self.answer_rank[i, j])}")
            lines.append(line)
        return "\n".join(lines)

    # -- exports ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Every statistic as JSON values (the logits are not included: recompute them)."""
        def nums(t: torch.Tensor | None) -> Any:
            return None if t is None else t.double().tolist()

        return {
            "format": LENS_FORMAT, "version": FORMAT_VERSION, "model_name": self.model_name,
            "prompt": self.prompt, "tokens": self.tokens, "positions": self.positions,
            "layers": self.layers, "k": self.k, "top_ids": self.top_ids.tolist(),
            "top_tokens": self.top_tokens, "top_probs": nums(self.top_probs),
            "entropy": nums(self.entropy), "kl": nums(self.kl), "answer": self.answer,
            "answer_text": self.answer_text, "answer_prob": nums(self.answer_prob),
            "answer_logit": nums(self.answer_logit),
            "answer_rank": None if self.answer_rank is None else self.answer_rank.tolist(),
            "extra": self.extra,
        }

    def to_json(self, path: str | os.PathLike[str] | None = None) -> str:
        """The statistics as JSON (written atomically to ``path`` when given)."""
        return _write_json(json.dumps(self.to_dict(), allow_nan=False), path)

    @classmethod
    def from_json(cls, text_or_path: str | bytes | os.PathLike[str]) -> LensResult:
        """Load :meth:`to_json`'s output (``logits`` is ``None``)."""
        d = _load_json(text_or_path, LENS_FORMAT)
        try:
            def t(key: str, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
                return None if d.get(key) is None else torch.tensor(d[key], dtype=dtype)

            def req(key: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
                return torch.tensor(d[key], dtype=dtype)

            out = cls(prompt=d["prompt"], tokens=list(d["tokens"]),
                      positions=list(d["positions"]), layers=list(d["layers"]),
                      top_ids=req("top_ids", torch.long), top_probs=req("top_probs"),
                      top_tokens=d["top_tokens"], entropy=req("entropy"), kl=req("kl"),
                      answer=d.get("answer"), answer_text=d.get("answer_text"),
                      answer_prob=t("answer_prob"), answer_logit=t("answer_logit"),
                      answer_rank=t("answer_rank", torch.long),
                      model_name=d.get("model_name", ""), extra=dict(d.get("extra") or {}))
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptResultError(f"invalid {LENS_FORMAT} file: {exc!r}") from None
        if tuple(out.top_ids.shape[:2]) != out.shape or tuple(out.entropy.shape) != out.shape:
            raise CorruptResultError(f"invalid {LENS_FORMAT} file: shapes do not match the axes")
        return out

    def to_pandas(self) -> Any:
        """One row per layer x position: top-1 token and probability, entropy, KL and the
        answer's probability and rank (a ``pandas.DataFrame``)."""
        import pandas as pd

        rows = []
        for i, layer in enumerate(self.layers):
            for j, pos in enumerate(self.positions):
                row = {"layer": layer, "position": pos, "token": self.tokens[pos],
                       "top_token": self.top_tokens[i][j][0],
                       "top_prob": float(self.top_probs[i, j, 0]),
                       "entropy": float(self.entropy[i, j]), "kl": float(self.kl[i, j])}
                if self.answer_prob is not None and self.answer_rank is not None:
                    row["answer_prob"] = float(self.answer_prob[i, j])
                    row["answer_rank"] = int(self.answer_rank[i, j])
                rows.append(row)
        return pd.DataFrame(rows)

    to_dataframe = to_pandas

    def plot(self, stat: str = "top", ax: Any = None, title: str | None = None) -> Any:
        """A layer x position heatmap (matplotlib ``Figure``): ``stat="top"`` colours each cell
        by the top token's probability and writes the token in it; ``"answer_prob"``,
        ``"answer_rank"`` (log scale), ``"entropy"`` and ``"kl"`` colour by that statistic."""
        from ..render.lens import plot_lens

        _check_choice(stat, LENS_STATS, "stat")
        return plot_lens(self, stat, ax=ax, title=title)

    def save(self, path: str | os.PathLike[str], format: str | None = None,
             stat: str = "top") -> Path:
        """Write ``.json``, ``.html`` or a figure (``.png``/``.svg``/``.pdf`` of ``stat``)."""
        return _save(self, path, format, stat=stat)

    def to_html(self, path: str | os.PathLike[str] | None = None) -> str:
        """A self-contained HTML page: the top token of every layer x position (hover: top-k),
        shaded by probability, and the answer's rank when given."""
        from ..render.lens import lens_html

        text = lens_html(self, page=True)
        if path is not None:
            atomic_write_text(path, text)
        return text

    def _repr_html_(self) -> str:
        from ..render.lens import lens_html

        return lens_html(self, page=False)


def logit_lens(model: HookedModel, prompts: Any, *, answer: Any = None,
               positions: Sequence[int] | None = None, k: int = 5,
               include_embed: bool = False, keep_logits: bool = True,
               threads: int | None = None) -> LensResult | list[LensResult]:
    """The logit lens of every layer x position, from one forward pass.

    Each layer's ``resid_post`` goes through the model's own final norm, with that vector's own
    statistics, then the unembedding (and the final logit soft-cap, if the model has one); the
    last layer's lens is the model's logits.

    Args:
        model: a :class:`~causalpatch.HookedModel` / ``InterpretableModel``.
        prompts: one prompt (a string or token ids): returns one :class:`LensResult`; a list of
            prompts (one padded batch, one forward): a list of them.
        answer: a single-token string (``" Paris"``) or id, or one per prompt: its probability,
            logit and rank are recorded at every cell.
        positions: token positions to read (negative count from each prompt's end); default
            every position.
        k: how many top tokens to keep per cell.
        include_embed: add an ``"embed"`` row first: the lens of the input of layer 0.
        keep_logits: keep the ``[n_layers, n_positions, vocab]`` logits on the result (they
            are 4 bytes per entry); the statistics are computed either way.
        threads: torch's CPU threads while the lens computes (default: torch's current
            setting), restored afterwards; as ``threads=`` of every method.

    Raises:
        OutOfRangeError: a position is beyond a prompt.
        InvalidArgumentError: an answer is not a single token (the message shows its tokens),
            or ``k`` is out of range. All checks happen before the forward pass.
    """
    check_threads(threads)
    single = is_single_prompt(prompts)
    token_rows = token_lists(model, prompts)
    n = len(token_rows)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= model.vocab_size:
        raise InvalidArgumentError(f"k must be an int in [1, {model.vocab_size}], got {k!r}")
    if not isinstance(include_embed, bool) or not isinstance(keep_logits, bool):
        raise InvalidTypeError("include_embed and keep_logits must be True or False")
    answers = _answers(model, answer, n, "answer")
    if positions is not None:
        if isinstance(positions, (int, str)) or not isinstance(positions, Sequence):
            raise InvalidTypeError(f"positions must be a list of ints, got {positions!r}")
        if not positions:
            raise InvalidArgumentError("positions is empty: give at least one position, or "
                                       "None for every position")
        per_row = [sorted({_position(p, len(r), "positions", i) for p in positions})
                   for i, r in enumerate(token_rows)]
    else:
        per_row = [list(range(len(r))) for r in token_rows]

    with using_threads(threads):
        batch = make_batch(token_rows, model.pad_token_id, model.device)
        rows = torch.tensor([i for i, ps in enumerate(per_row) for _ in ps], dtype=torch.long)
        cols = torch.tensor([p for ps in per_row for p in ps], dtype=torch.long)
        names = (["blocks.0.resid_pre"] if include_embed else []) + [
            f"blocks.{layer}.resid_post" for layer in range(model.n_layers)]
        layers: list[Any] = (["embed"] if include_embed else []) + list(range(model.n_layers))
        got, _ = _read(model, batch, names, rows, cols, full_logits=False)

        decode = _decoder(model)
        texts = [prompts] if isinstance(prompts, str) else (
            list(prompts) if isinstance(prompts, (list, tuple))
            and all(isinstance(p, str) for p in prompts) else None)
        results: list[LensResult] = []
        start = 0
        for i, ps in enumerate(per_row):
            cells = slice(start, start + len(ps))
            start += len(ps)
            hidden = torch.stack([got[name][cells] for name in names])  # [layers, pos, d]
            stats = _lens_stats(model, hidden, None if answers is None else answers[i], k,
                                keep_logits)
            top_ids = stats["top_ids"]
            top_tokens = [[[decode(int(t)) for t in cell] for cell in row] for row in top_ids]
            results.append(LensResult(
                prompt=texts[i] if texts is not None else model.tokenizer.decode(token_rows[i]),
                tokens=[decode(t) for t in token_rows[i]], positions=ps, layers=list(layers),
                top_ids=top_ids, top_probs=stats["top_probs"], top_tokens=top_tokens,
                entropy=stats["entropy"], kl=stats["kl"], logits=stats.get("logits"),
                answer=None if answers is None else answers[i],
                answer_text=None if answers is None else decode(answers[i]),
                answer_prob=stats.get("answer_prob"), answer_logit=stats.get("answer_logit"),
                answer_rank=stats.get("answer_rank"), model_name=model.name))
        return results[0] if single else results


def _lens_stats(model: HookedModel, hidden: torch.Tensor, answer: int | None, k: int,
                keep_logits: bool) -> dict[str, torch.Tensor]:
    """Lens logits and statistics of ``hidden`` ``[layers, pos, d]``; the last layer is the
    model's output (the KL reference). With ``keep_logits`` every cell is unembedded by one
    matrix product; otherwise blocks of positions (every layer of each) bound the memory."""
    n_layers, n_pos, _ = hidden.shape
    per = n_pos if keep_logits else max(1, LENS_BLOCK_CELLS // n_layers)
    pieces: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        for lo in range(0, n_pos, per):
            logits = model.runtime.unembed(hidden[:, lo:lo + per], model.config).float()
            # the last layer again, alone: the same product as the model's own unembedding
            # (same shapes, so the same rounding), so the last row is exactly its logits
            logits[-1] = model.runtime.unembed(hidden[-1, lo:lo + per], model.config).float()
            for key, value in _cell_stats(logits, answer, k).items():
                pieces.setdefault(key, []).append(value)
            if keep_logits:
                pieces.setdefault("logits", []).append(logits)
    return {key: value[0] if len(value) == 1 else torch.cat(value, dim=1)
            for key, value in pieces.items()}


def _cell_stats(logits: torch.Tensor, answer: int | None, k: int) -> dict[str, torch.Tensor]:
    """Statistics of every cell of ``logits`` ``[layers, pos, vocab]`` (the last layer is the
    reference of the KL). Rows are processed :data:`STATS_CHUNK_BYTES` at a time, so that the
    few passes each row needs (softmax, top-k, rank) run on data still in the CPU cache."""
    n_layers, n_pos, vocab = logits.shape
    flat = logits.reshape(-1, vocab)
    n = flat.shape[0]
    lse = torch.empty(n, dtype=flat.dtype, device=flat.device)
    mean_logit = torch.empty_like(lse)  # sum_v p_v z_v
    top_values = torch.empty(n, k, dtype=flat.dtype, device=flat.device)
    top_ids = torch.empty(n, k, dtype=torch.long, device=flat.device)
    rank = torch.empty(n, dtype=torch.long, device=flat.device) if answer is not None else None
    step = max(1, STATS_CHUNK_BYTES // (4 * vocab))
    for lo in range(0, n, step):
        z = flat[lo:lo + step]
        p = torch.softmax(z, -1)
        top = z.topk(k, dim=-1)
        top_values[lo:lo + step], top_ids[lo:lo + step] = top.values, top.indices
        # log-sum-exp from the top token's probability: z_max - log p_max (p_max >= 1/vocab)
        lse[lo:lo + step] = top.values[:, 0] - p.gather(1, top.indices[:, :1])[:, 0].log()
        mean_logit[lo:lo + step] = (p * z).sum(-1)
        if rank is not None:
            rank[lo:lo + step] = (z > z[:, answer, None]).sum(-1) + 1
    lse = lse.view(n_layers, n_pos)
    mean_logit = mean_logit.view(n_layers, n_pos)
    # KL(final || layer) = sum_v p_f (log p_f - log p_l)
    #                    = (<p_f, z_f> - lse_f) - (<p_f, z_l> - lse_l)
    p_final = torch.softmax(logits[-1], -1)  # [pos, vocab]
    cross = torch.einsum("lpv,pv->lp", logits, p_final)
    kl = ((mean_logit[-1] - lse[-1])[None] - cross + lse).clamp_min(0.0)
    kl[-1] = 0.0
    out = {"top_ids": top_ids.view(n_layers, n_pos, k),
           "top_probs": (top_values - lse.reshape(-1, 1)).exp().view(n_layers, n_pos, k),
           "entropy": (lse - mean_logit).clamp_min(0.0), "kl": kl}
    if answer is not None and rank is not None:
        a = logits[..., answer]
        out.update(answer_logit=a.clone(), answer_prob=(a - lse).exp(),
                   answer_rank=rank.view(n_layers, n_pos))
    return out


# -- direct logit attribution ------------------------------------------------------------------
@dataclass(eq=False)
class DLAResult:
    """Direct logit attribution: each residual-stream write's share of the logit difference.

    Attributes:
        unit: ``"component"``, ``"layer"``, ``"head"`` or ``"neuron"``.
        names: the parts, in residual-stream order (``embed``, ``pos_embed`` on GPT-2, then per
            layer ``blocks.L.attn`` / ``blocks.L.attn.head.H`` + ``blocks.L.attn.bias`` and
            ``blocks.L.mlp`` / ``blocks.L.mlp.neuron.N`` + ``blocks.L.mlp.bias`` (or
            ``blocks.L`` for ``unit="layer"``), then ``ln_final.bias`` and ``unembed.bias``
            where the model has them).
        values: ``[n_parts]`` float64, the mean over prompts of each part.
        per_prompt: ``[n_prompts, n_parts]`` float64.
        logit_diffs: per prompt, the attributed logit difference (pre-cap on soft-capped
            models); ``per_prompt[i].sum() == logit_diffs[i]`` up to float rounding.
        model_logit_diffs: per prompt, the difference of the logits the model returns (after
            the soft-cap, where there is one).
        softcap: the model's final logit soft-cap, or ``None``.
        sum_error: ``max_i |per_prompt[i].sum() - logit_diffs[i]|``.
        metric: ``"logit_diff"`` or ``"logit"`` (no incorrect answer).
        correct, incorrect: answer ids per prompt (``incorrect`` ``None`` for ``"logit"``).
        correct_text, incorrect_text: their strings.
        positions: the attributed position of each prompt (absolute).
        prompts: the prompts; tokens: the token strings of each.
        n_layers, n_heads, d_mlp: the model's sizes (for :meth:`matrix`).
        model_name: the model's name.
    """

    unit: str
    names: list[str]
    values: torch.Tensor
    per_prompt: torch.Tensor
    logit_diffs: list[float]
    model_logit_diffs: list[float]
    metric: str
    correct: list[int]
    incorrect: list[int] | None
    correct_text: list[str]
    incorrect_text: list[str] | None
    positions: list[int]
    prompts: list[str]
    tokens: list[list[str]]
    n_layers: int
    n_heads: int
    d_mlp: int
    softcap: float | None = None
    sum_error: float = 0.0
    model_name: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        return (f"DLAResult({self.model_name!r}, unit={self.unit!r}, parts={len(self.names)}, "
                f"prompts={len(self.prompts)}, {self.metric}={self.logit_diff:.4g})")

    @property
    def parts(self) -> dict[str, float]:
        """Part name -> its mean value over prompts; the values sum to :attr:`logit_diff`."""
        return dict(zip(self.names, self.values.tolist()))

    @property
    def logit_diff(self) -> float:
        """The attributed logit difference (mean over prompts; pre-cap on soft-capped models)."""
        return float(sum(self.logit_diffs) / len(self.logit_diffs))

    @property
    def model_logit_diff(self) -> float:
        """The logit difference of the logits the model returns (mean over prompts)."""
        return float(sum(self.model_logit_diffs) / len(self.model_logit_diffs))

    def top(self, k: int = 10, by: str = "abs") -> list[tuple[str, float]]:
        """The ``k`` largest parts: by ``"abs"`` value, ``"positive"`` or ``"negative"``."""
        _check_choice(by, ("abs", "positive", "negative"), "by")
        v = self.values
        key = v.abs() if by == "abs" else (v if by == "positive" else -v)
        order = torch.argsort(key, descending=True, stable=True)[: max(0, int(k))]
        return [(self.names[i], float(v[i])) for i in order.tolist()]

    def matrix(self) -> tuple[torch.Tensor, list[str]]:
        """The per-layer parts as a matrix and its column names: ``[n_layers, 2]`` (attn, mlp)
        for ``unit="component"``, ``[n_layers, 1]`` for ``"layer"``, ``[n_layers, n_heads]``
        for ``"head"``, ``[n_layers, d_mlp]`` for ``"neuron"`` (biases and embeddings are not
        in it)."""
        index = {name: i for i, name in enumerate(self.names)}
        if self.unit == "component":
            cols, fmt = ["attn", "mlp"], "blocks.{L}.{c}"
        elif self.unit == "layer":
            cols, fmt = ["total"], "blocks.{L}"
        elif self.unit == "head":
            cols, fmt = [str(h) for h in range(self.n_heads)], "blocks.{L}.attn.head.{c}"
        else:
            cols, fmt = [str(n) for n in range(self.d_mlp)], "blocks.{L}.mlp.neuron.{c}"
        out = torch.zeros(self.n_layers, len(cols), dtype=torch.float64)
        for layer in range(self.n_layers):
            for j, c in enumerate(cols):
                out[layer, j] = self.values[index[fmt.format(L=layer, c=c)]]
        return out, cols

    def summary(self, k: int = 10) -> str:
        """What is attributed, the closure check, and the ``k`` largest parts."""
        from ..render.lens import dla_target

        what = dla_target(self)
        cap = " (pre-cap)" if self.softcap else ""
        lines = [f"direct logit attribution ({self.unit}) of {what}{cap} = "
                 f"{self.logit_diff:.4f} over {len(self.prompts)} prompt(s); parts sum to "
                 f"{float(self.values.sum()):.4f}"]
        lines += [f"  {name:<28} {value:+.4f}" for name, value in self.top(k)]
        return "\n".join(lines)

    # -- exports ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": DLA_FORMAT, "version": FORMAT_VERSION, "model_name": self.model_name,
            "unit": self.unit, "metric": self.metric, "names": self.names,
            "values": self.values.tolist(), "per_prompt": self.per_prompt.tolist(),
            "logit_diffs": self.logit_diffs, "model_logit_diffs": self.model_logit_diffs,
            "softcap": self.softcap, "sum_error": self.sum_error, "correct": self.correct,
            "incorrect": self.incorrect, "correct_text": self.correct_text,
            "incorrect_text": self.incorrect_text, "positions": self.positions,
            "prompts": self.prompts, "tokens": self.tokens, "n_layers": self.n_layers,
            "n_heads": self.n_heads, "d_mlp": self.d_mlp, "extra": self.extra,
        }

    def to_json(self, path: str | os.PathLike[str] | None = None) -> str:
        """Every part (mean and per prompt) as JSON (written atomically to ``path``)."""
        return _write_json(json.dumps(self.to_dict(), allow_nan=False), path)

    @classmethod
    def from_json(cls, text_or_path: str | bytes | os.PathLike[str]) -> DLAResult:
        d = _load_json(text_or_path, DLA_FORMAT)
        try:
            out = cls(unit=d["unit"], names=list(d["names"]),
                      values=torch.tensor(d["values"], dtype=torch.float64),
                      per_prompt=torch.tensor(d["per_prompt"], dtype=torch.float64),
                      logit_diffs=list(d["logit_diffs"]),
                      model_logit_diffs=list(d["model_logit_diffs"]), metric=d["metric"],
                      correct=list(d["correct"]), incorrect=d.get("incorrect"),
                      correct_text=list(d["correct_text"]),
                      incorrect_text=d.get("incorrect_text"), positions=list(d["positions"]),
                      prompts=list(d["prompts"]), tokens=d["tokens"], n_layers=d["n_layers"],
                      n_heads=d["n_heads"], d_mlp=d["d_mlp"], softcap=d.get("softcap"),
                      sum_error=d.get("sum_error", 0.0), model_name=d.get("model_name", ""),
                      extra=dict(d.get("extra") or {}))
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptResultError(f"invalid {DLA_FORMAT} file: {exc!r}") from None
        if out.unit not in UNITS or out.values.shape != (len(out.names),) \
                or tuple(out.per_prompt.shape) != (len(out.prompts), len(out.names)):
            raise CorruptResultError(f"invalid {DLA_FORMAT} file: unit or shapes do not match")
        return out

    def to_pandas(self) -> Any:
        """One row per part: ``part``, ``layer`` (``None`` outside the layers), ``kind``
        (embed, attn, head, attn_bias, mlp, neuron, mlp_bias, layer, ln_final_bias,
        unembed_bias), ``index`` (head or neuron), ``value`` and one ``prompt_i`` column per
        prompt."""
        import pandas as pd

        rows = []
        for j, name in enumerate(self.names):
            layer, kind, index = _part_fields(name)
            row = {"part": name, "layer": layer, "kind": kind, "index": index,
                   "value": float(self.values[j])}
            for i in range(self.per_prompt.shape[0]):
                row[f"prompt_{i}"] = float(self.per_prompt[i, j])
            rows.append(row)
        return pd.DataFrame(rows)

    to_dataframe = to_pandas

    def plot(self, ax: Any = None, title: str | None = None, k: int = 20) -> Any:
        """A matplotlib ``Figure``: bars per layer (attn and MLP, or per layer), a layer x head
        heatmap for ``unit="head"``, or the ``k`` largest parts for ``unit="neuron"``."""
        from ..render.lens import plot_dla

        return plot_dla(self, ax=ax, title=title, k=k)

    def save(self, path: str | os.PathLike[str], format: str | None = None) -> Path:
        """Write ``.json``, ``.html`` or a figure (``.png``/``.svg``/``.pdf``)."""
        return _save(self, path, format)

    def to_html(self, path: str | os.PathLike[str] | None = None) -> str:
        """A self-contained HTML page: the numbers, the check that the parts sum to the logit
        difference, and the largest parts as bars."""
        from ..render.lens import dla_html

        text = dla_html(self, page=True)
        if path is not None:
            atomic_write_text(path, text)
        return text

    def _repr_html_(self) -> str:
        from ..render.lens import dla_html

        return dla_html(self, page=False)


def _part_fields(name: str) -> tuple[int | None, str, int | None]:
    """``blocks.3.attn.head.2`` -> ``(3, "head", 2)``; ``embed`` -> ``(None, "embed", None)``."""
    bits = name.split(".")
    if bits[0] != "blocks":
        return None, name.replace(".", "_"), None
    layer = int(bits[1])
    rest = bits[2:]
    if not rest:
        return layer, "layer", None
    if len(rest) == 1:
        return layer, rest[0], None
    if rest[1] == "bias":
        return layer, f"{rest[0]}_bias", None
    return layer, rest[1], int(rest[2])


def _data(model: HookedModel, data: Any, correct: Any, incorrect: Any
          ) -> tuple[list[list[int]], list[str] | None, Any, Any]:
    """Token rows, prompt texts (None for ids) and answers of prompts or a dataset."""
    if not isinstance(data, (str, list, tuple, torch.Tensor)) and hasattr(data, "clean"):
        prompts = data.clean
        if correct is None:
            correct = list(getattr(data, "correct", []) or []) or None
            if incorrect is None:
                incorrect = list(getattr(data, "incorrect", []) or []) or None
        rows = token_lists(model, prompts, "data.clean")
        texts: list[str] | None = (list(prompts) if all(isinstance(p, str) for p in prompts)
                                   else None)
        return rows, texts, correct, incorrect
    rows = token_lists(model, data, "data")
    if isinstance(data, str):
        texts = [data]
    elif isinstance(data, (list, tuple)) and data and all(isinstance(p, str) for p in data):
        texts = list(data)
    else:
        texts = None
    return rows, texts, correct, incorrect


def direct_logit_attribution(model: HookedModel, data: Any, unit: str = "component", *,
                             correct: Any = None, incorrect: Any = None,
                             position: int = -1, threads: int | None = None) -> DLAResult:
    """Direct logit attribution: each residual-stream write projected onto the answer direction.

    The parts (embeddings; every attention output, per head with ``unit="head"``; every MLP
    output, per neuron with ``unit="neuron"``; output-projection biases where split out; the
    final norm's bias and the unembedding's bias) sum to the model's logit difference at
    ``position`` (tested to 1e-4 on every adapter family). The final norm's scale (and
    LayerNorm's centring) is taken from the clean run and frozen, which makes the readout
    linear: a part is ``frozen_norm(write) . (W_U[:, correct] - W_U[:, incorrect])``. Gemma
    2/3's post-attention/post-feedforward norms are frozen the same way for the per-head and
    per-neuron split; GPT-NeoX's parallel residual needs nothing special (attention and MLP
    both write to the stream); tied embeddings are read through the model's own output
    projection.

    Soft-capped logits (Gemma 2/3 ``final_logit_softcapping``): the cap is not linear, so the
    parts attribute the **pre-cap** logit difference (``result.logit_diff``);
    ``result.model_logit_diff`` is the capped difference the model outputs.

    Args:
        model: a :class:`~causalpatch.HookedModel` / ``InterpretableModel``.
        data: a prompt, a list of prompts (one padded batch, one forward), token ids, or a
            dataset (its ``clean`` prompts and, unless given here, its answers).
        unit: ``"component"`` (attn and MLP of each layer), ``"layer"`` (their sum),
            ``"head"`` (every head of every layer, plus each attention bias) or ``"neuron"``
            (every MLP neuron, plus each MLP bias).
        correct: the answer: a single-token string or id, or one per prompt.
        incorrect: the competing answer (same forms), or ``None`` to attribute
            ``logit(correct)`` alone.
        position: the token position (negative counts from each prompt's end; default the
            last token).
        threads: torch's CPU threads while the attribution computes (default: torch's current
            setting), restored afterwards; as ``threads=`` of every method.

    Returns:
        :class:`DLAResult`; ``result.parts`` maps each part to its mean over prompts.

    Raises:
        InvalidArgumentError: an unknown unit, a missing or multi-token answer (the message
            shows its tokens), or answer lists of the wrong length.
        OutOfRangeError: ``position`` is beyond a prompt. All checks happen before the forward.
    """
    check_threads(threads)
    _check_choice(unit, UNITS, "unit")
    rows_ids, texts, correct, incorrect = _data(model, data, correct, incorrect)
    n = len(rows_ids)
    if correct is None:
        raise InvalidArgumentError(
            "correct is required: the answer token whose logit is attributed, e.g. "
            "correct=' Paris' (and incorrect=' London' for a logit difference)")
    good = _answers(model, correct, n, "correct")
    bad = _answers(model, incorrect, n, "incorrect")
    assert good is not None
    positions = [_position(position, len(r), "position", i) for i, r in enumerate(rows_ids)]

    runtime = model.runtime
    n_layers = model.n_layers
    softcap = runtime.final_softcap(model.config)
    pos_path = runtime.pos_embed_path()
    names = ["blocks.0.resid_pre", f"blocks.{n_layers - 1}.resid_post"]
    if pos_path is not None:
        names.append(pos_path)
    if softcap is not None:
        names.append("ln_final")
    post = {block: runtime.post_norm_input(block) for block in ("attn", "mlp")}
    split = {"attn": unit == "head", "mlp": unit == "neuron"}
    for layer in range(n_layers):
        for block, inner in (("attn", "attn.z"), ("mlp", "mlp.post")):
            names.append(f"blocks.{layer}.{block}")
            if split[block]:
                names.append(f"blocks.{layer}.{inner}")
                if post[block] is not None:
                    names.append(f"blocks.{layer}.{post[block]}")

    with using_threads(threads):
        batch = make_batch(rows_ids, model.pad_token_id, model.device)
        last_only = not batch.padded and all(p == len(r) - 1 for p, r in zip(positions, rows_ids))
        row_index = torch.arange(n, dtype=torch.long)
        col_index = torch.tensor(positions, dtype=torch.long)
        got, logits = _read(model, batch, names, row_index, col_index, full_logits=not last_only)

        f64 = torch.float64
        with torch.no_grad():
            at = logits[:, -1] if last_only else logits[row_index.to(logits.device),
                                                        col_index.to(logits.device)]
            at = at.to(f64)
            good_t = torch.tensor(good, dtype=torch.long, device=at.device)
            model_diff = at.gather(1, good_t[:, None])[:, 0]
            if bad is not None:
                bad_t = torch.tensor(bad, dtype=torch.long, device=at.device)
                model_diff = model_diff - at.gather(1, bad_t[:, None])[:, 0]

            final = got[f"blocks.{n_layers - 1}.resid_post"]  # [n, d]
            device = final.device
            frozen = runtime.freeze_final_norm(final, f64)
            w_good, b_good = runtime.unembed_rows(good)
            direction = w_good.to(device, f64)
            dbias = None if b_good is None else b_good.to(device, f64)
            if bad is not None:
                w_bad, b_bad = runtime.unembed_rows(bad)
                direction = direction - w_bad.to(device, f64)
                if dbias is not None and b_bad is not None:
                    dbias = dbias - b_bad.to(device, f64)
            u = frozen.pullback(direction)  # [n, d]: a write's part is write . u

            if softcap is None:
                target = model_diff
            else:  # the pre-cap difference: the model's own ln_final output through the head
                normed = got["ln_final"].to(device, f64)
                target = (normed * direction).sum(-1) + (0.0 if dbias is None else dbias)

            part_names: list[str] = []
            columns: list[torch.Tensor] = []

            def add(name: str, value: torch.Tensor) -> None:
                part_names.append(name)
                columns.append(value.reshape(n, -1) if value.dim() > 1 else value[:, None])

            def dot(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                return (x.to(device, f64) * v).sum(-1)

            start = got["blocks.0.resid_pre"].to(device, f64)
            if pos_path is not None:
                pos = got[pos_path].to(device, f64)
                add("embed", dot(start - pos, u))
                add("pos_embed", dot(pos, u))
            else:
                add("embed", dot(start, u))

            for layer in range(n_layers):
                layer_total = torch.zeros(n, dtype=f64, device=device)
                for block, inner, word in (("attn", "attn.z", "head"),
                                           ("mlp", "mlp.post", "neuron")):
                    if not split[block]:
                        value = dot(got[f"blocks.{layer}.{block}"], u)
                        if unit == "layer":
                            layer_total = layer_total + value
                        else:
                            add(f"blocks.{layer}.{block}", value)
                        continue
                    v = u
                    extra_bias = torch.zeros(n, dtype=f64, device=device)
                    if post[block] is not None:
                        pnorm = runtime.freeze_post_norm(layer, block,
                                                         got[f"blocks.{layer}.{post[block]}"], f64)
                        v = pnorm.pullback(u)
                        if pnorm.bias is not None:
                            extra_bias = (pnorm.bias * u).sum(-1)
                    w, b = runtime.output_projection(layer, block)  # [d_in, d_model]
                    # [n, d_in]: each input unit's part per unit of its activation. The product
                    # runs in the weights' dtype (a float64 copy of every projection would cost
                    # more than the forward); its rounding (~1e-7 relative) is far below 1e-4
                    coeff = (v.to(w.dtype) @ w.to(device).T).to(f64)
                    x = got[f"blocks.{layer}.{inner}"].to(device, f64).reshape(n, -1)
                    contrib = x * coeff  # [n, d_in]
                    if block == "attn":
                        contrib = contrib.reshape(n, model.n_heads, -1).sum(-1)
                    for j in range(contrib.shape[1]):
                        part_names.append(f"blocks.{layer}.{block}.{word}.{j}")
                    columns.append(contrib)
                    bias_value = extra_bias + (
                        0.0 if b is None else (b.to(device, f64) * v).sum(-1))
                    add(f"blocks.{layer}.{block}.bias", bias_value)
                if unit == "layer":
                    add(f"blocks.{layer}", layer_total)
            if frozen.bias is not None:
                add("ln_final.bias", (frozen.bias * direction).sum(-1))
            if dbias is not None:
                add("unembed.bias", dbias)

            per_prompt = torch.cat(columns, dim=1).cpu()
            targets = target.cpu()
            error = float((per_prompt.sum(1) - targets).abs().max())

    decode = _decoder(model)
    prompts = texts if texts is not None else [model.tokenizer.decode(r) for r in rows_ids]
    return DLAResult(
        unit=unit, names=part_names, values=per_prompt.mean(0), per_prompt=per_prompt,
        logit_diffs=targets.tolist(), model_logit_diffs=model_diff.cpu().tolist(),
        metric="logit_diff" if bad is not None else "logit", correct=good, incorrect=bad,
        correct_text=[decode(t) for t in good],
        incorrect_text=None if bad is None else [decode(t) for t in bad],
        positions=positions, prompts=prompts, tokens=[[decode(t) for t in r] for r in rows_ids],
        n_layers=n_layers, n_heads=model.n_heads, d_mlp=model.d_mlp, softcap=softcap,
        sum_error=error, model_name=model.name)


__all__ = ["DLAResult", "LensResult", "direct_logit_attribution", "logit_lens"]
