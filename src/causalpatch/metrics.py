"""Metrics on next-token logits, one signature and a name registry.

Every metric takes the logits at the last position, ``[batch, vocab]``, and a
:class:`MetricInputs`, and returns one value per row, ``[batch]``, in float32 whatever the
model's dtype. Two kinds:

* **scores** (``logit_diff``, ``logit``, ``prob``, ``logprob``): a number about the answer
  tokens; patching moves it from the base run's value towards the source run's.
* **distances** (``l2``, ``mse``, ``cosine``, ``kl``, ``ce_diff``): how far the patched run is
  from the *source* run; 0 at the source.

Both are normalised the same way, :func:`normalize`:
``effect = (patched - base) / (source - base)``. For a distance, ``source`` is 0, so the effect is
the seeds' recovery ``(d_base - d_patched) / d_base``.

Numerics: logits are cast to float32 before any arithmetic; KL uses ``log_softmax`` (no
``log(0)``); L2 sums squares in float32 (float16 logits cannot overflow it, even with 262k-token
vocabularies). A non-finite result raises :class:`NonFiniteError` instead of propagating.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from .errors import InvalidArgumentError, InvalidTypeError, NonFiniteError, NormalizationError


#: The metric every entry point uses when none is given, the dataset declares none and the
#: pairs have answer tokens ...
DEFAULT_METRIC = "logit_diff"
#: ... and the one it uses when they have no answer tokens (the seeds' default).
DEFAULT_METRIC_WITHOUT_ANSWERS = "l2"


@dataclass(frozen=True)
class MetricInputs:
    """What a metric may need besides the logits (all rows aligned with the logits' batch).

    Attributes:
        target_logits: ``[batch, vocab]`` logits of the source run (distance metrics).
        correct: ``[batch]`` answer token ids.
        incorrect: ``[batch]`` wrong-answer token ids.
    """

    target_logits: torch.Tensor | None = None
    correct: torch.Tensor | None = None
    incorrect: torch.Tensor | None = None

    def rows(self, index: torch.Tensor | slice) -> MetricInputs:
        """The inputs restricted to some rows."""
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return MetricInputs(pick(self.target_logits), pick(self.correct), pick(self.incorrect))

    def on_columns(self, columns: Sequence[int]) -> MetricInputs:
        """The inputs for logits that hold only the vocabulary entries ``columns``, ascending
        without repeats (what an engine asked for ``columns`` returns): answer ids become
        indices into them, target logits keep those entries. Exact for a metric that reads
        only the answer logits (:attr:`Metric.answers_only`).

        Raises:
            InvalidArgumentError: an answer id is not among ``columns``.
        """
        cols = torch.tensor(sorted(set(columns)), dtype=torch.long)

        def index(ids: torch.Tensor | None) -> torch.Tensor | None:
            if ids is None:
                return None
            at = torch.searchsorted(cols, ids.cpu()).clamp(max=len(cols) - 1)
            if not torch.equal(cols[at], ids.cpu()):
                raise InvalidArgumentError(
                    f"answer ids {sorted(set(ids.tolist()) - set(cols.tolist()))} are not among "
                    f"the logit columns {cols.tolist()}: pass every answer token in columns")
            return at.to(ids.device)

        target = None if self.target_logits is None else self.target_logits[..., cols]
        return MetricInputs(target, index(self.correct), index(self.incorrect))

    def expand(self, n: int) -> MetricInputs:
        """Repeat single-row inputs ``n`` times."""
        grow = lambda t: None if t is None else t.expand(n, *t.shape[1:])  # noqa: E731
        return MetricInputs(grow(self.target_logits), grow(self.correct), grow(self.incorrect))


MetricFn = Callable[[torch.Tensor, MetricInputs], torch.Tensor]


@dataclass(frozen=True)
class Metric:
    """A registered metric."""

    name: str
    fn: MetricFn
    kind: Literal["score", "distance"]
    needs: tuple[str, ...] = ()
    doc: str = ""
    #: reads only the answer tokens' logits (``correct``/``incorrect`` columns), so an engine
    #: may compute just those columns of the unembedding
    answers_only: bool = False

    def __call__(self, logits: torch.Tensor, inputs: MetricInputs) -> torch.Tensor:
        values = self.fn(logits.float(), inputs)
        if values.dim() == 0:
            values = values.expand(logits.shape[0])
        values = values.float()
        if not torch.isfinite(values).all():
            raise NonFiniteError(
                f"metric {self.name!r} produced non-finite values {values.tolist()[:5]}; check the "
                "model's dtype (try float32) and the inputs")
        return values


def _need(inputs: MetricInputs, name: str, metric: str) -> torch.Tensor:
    value = getattr(inputs, name)
    if value is None:
        raise InvalidArgumentError(
            f"metric {metric!r} needs {name}_token; pass metric_kwargs={{'correct_token': ..., "
            "'incorrect_token': ...}} or correct=' Mary', incorrect=' John'")
    return value


def _gather(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return logits.gather(-1, ids.view(-1, 1).to(logits.device)).squeeze(-1)


def logit_diff(logits: torch.Tensor, inputs: MetricInputs) -> torch.Tensor:
    """``logit[correct] - logit[incorrect]`` per row."""
    return _gather(logits, _need(inputs, "correct", "logit_diff")) - _gather(
        logits, _need(inputs, "incorrect", "logit_diff"))


def logit(logits: torch.Tensor, inputs: MetricInputs) -> torch.Tensor:
    """The logit of the correct token."""
    return _gather(logits, _need(inputs, "correct", "logit"))


def prob(logits: torch.Tensor, inputs: MetricInputs) -> torch.Tensor:
    """Probability of the correct token."""
    return _gather(torch.softmax(logits, dim=-1), _need(inputs, "correct", "prob"))


def logprob(logits: torch.Tensor, inputs: MetricInputs) -> torch.Tensor:
    """Log-probability of the correct token (stable ``log_softmax``)."""
    return _gather(torch.log_softmax(logits, dim=-1), _need(inputs, "correct", "logprob"))


def ce_diff(logits: torch.Tensor, inputs: MetricInputs) -> torch.Tensor:
    """Cross-entropy difference to the source run: ``CE(patched) - CE(source)`` of the correct
    token, in nats (0 at the source; positive = more loss than the source run).

    Normalised, it is the fraction of the base run's extra loss that patching removes.
    """
    correct = _need(inputs, "correct", "ce_diff")
    target = _need(inputs, "target_logits", "ce_diff").float()
    ce = -_gather(torch.log_softmax(logits, dim=-1), correct)
    ce_source = -_gather(torch.log_softmax(target, dim=-1), correct)
    return ce - ce_source


def l2(logits: torch.Tensor, inputs: MetricInputs) -> torch.Tensor:
    """Euclidean distance to the source logits, in float32."""
    target = _need(inputs, "target_logits", "l2").float()
    return (logits - target).pow(2).sum(dim=-1).sqrt()  # torch.sum's cascade is accurate


def mse(logits: torch.Tensor, inputs: MetricInputs) -> torch.Tensor:
    """Mean squared difference to the source logits."""
    target = _need(inputs, "target_logits", "mse").float()
    return (logits - target).pow(2).mean(dim=-1)


def cosine(logits: torch.Tensor, inputs: MetricInputs) -> torch.Tensor:
    """Cosine distance ``1 - cos(logits, source logits)``."""
    target = _need(inputs, "target_logits", "cosine").float()
    distance = 1.0 - F.cosine_similarity(logits, target, dim=-1, eps=1e-12)
    same = (logits == target).all(dim=-1)  # identical (even all-zero) logits: distance 0
    return torch.where(same, torch.zeros_like(distance), distance)


def kl(logits: torch.Tensor, inputs: MetricInputs) -> torch.Tensor:
    """``KL(source || patched)`` of the next-token distributions, from ``log_softmax``."""
    target = _need(inputs, "target_logits", "kl").float()
    log_p = torch.log_softmax(target, dim=-1)
    log_q = torch.log_softmax(logits, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1).clamp_min(0.0)


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("logit_diff", logit_diff, "score", ("correct", "incorrect"),
               logit_diff.__doc__ or "", answers_only=True),
        Metric("logit", logit, "score", ("correct",), logit.__doc__ or "", answers_only=True),
        Metric("prob", prob, "score", ("correct",), prob.__doc__ or ""),
        Metric("logprob", logprob, "score", ("correct",), logprob.__doc__ or ""),
        Metric("ce_diff", ce_diff, "distance", ("correct", "target_logits"),
               ce_diff.__doc__ or ""),
        Metric("l2", l2, "distance", ("target_logits",), l2.__doc__ or ""),
        Metric("mse", mse, "distance", ("target_logits",), mse.__doc__ or ""),
        Metric("cosine", cosine, "distance", ("target_logits",), cosine.__doc__ or ""),
        Metric("kl", kl, "distance", ("target_logits",), kl.__doc__ or ""),
    )
}


def register_metric(name: str, fn: MetricFn, kind: Literal["score", "distance"] = "score",
                    needs: tuple[str, ...] = ()) -> Metric:
    """Add a metric to the registry so it can be named by string."""
    metric = Metric(name, fn, kind, needs, fn.__doc__ or "")
    METRICS[name] = metric
    return metric


def get_metric(metric: str | Metric | Callable[..., Any]) -> Metric:
    """Look up a metric by name, or wrap a callable.

    A callable may take ``(logits)`` or ``(logits, inputs)`` and return ``[batch]`` or a scalar;
    it is treated as a score.

    Raises:
        InvalidArgumentError: unknown name (the message lists the known ones).
    """
    if isinstance(metric, Metric):
        return metric
    if isinstance(metric, str):
        if metric not in METRICS:
            raise InvalidArgumentError(
                f"unknown metric {metric!r}; expected one of {', '.join(sorted(METRICS))} or a "
                "callable (logits [batch, vocab]) -> [batch]")
        return METRICS[metric]
    if callable(metric):
        try:
            n_params = len(inspect.signature(metric).parameters)
        except (TypeError, ValueError):
            n_params = 2
        fn = metric if n_params >= 2 else (lambda logits, inputs, _f=metric: _f(logits))
        name = getattr(metric, "__name__", "custom")
        return Metric(name, lambda lg, inp: torch.as_tensor(fn(lg, inp), dtype=torch.float32),
                      "score")
    raise InvalidTypeError(
        f"metric must be a name ({', '.join(sorted(METRICS))}) or a callable, got "
        f"{type(metric).__name__}")


def normalize(patched: torch.Tensor, base: torch.Tensor | float, source: torch.Tensor | float,
              what: str = "metric") -> torch.Tensor:
    """``(patched - base) / (source - base)`` with a specific error when undefined.

    Raises:
        NormalizationError: ``|source - base|`` is too small relative to the values.
    """
    base_t = torch.as_tensor(base, dtype=torch.float32)
    source_t = torch.as_tensor(source, dtype=torch.float32)
    gap = source_t - base_t
    scale = torch.maximum(torch.ones(()), torch.maximum(base_t.abs(), source_t.abs()))
    if bool((gap.abs() <= 1e-6 * scale).any()):
        raise NormalizationError(
            f"cannot normalise the effect: the {what} is {float(source_t.mean()):.6g} on the "
            f"source run and {float(base_t.mean()):.6g} on the base run, so (source - base) is "
            "~0. Choose prompts/answers that the model tells apart, or pass normalize=False for "
            "raw metric values")
    return (patched.float() - base_t) / gap


#: Elements per ``torch.quantile`` call in :func:`bootstrap_interval` (below torch's limit).
_QUANTILE_ELEMENTS = 1 << 22


CI_N_BOOT = 1000
"""Resamples of the 95% intervals that results show (``summary()``, the HTML report's hover,
``to_json``'s ``ci95``)."""
CI_SEED = 0
"""Seed of those resamples: the shown intervals are the same on every run."""


def bootstrap_interval(per_pair: torch.Tensor, *, base: torch.Tensor | None = None,
                       source: torch.Tensor | None = None, level: float = 0.95,
                       n_boot: int = 1000, seed: int = 0, skip_missing: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Percentile bootstrap interval of the mean effect over pairs.

    Pairs are resampled with replacement ``n_boot`` times and the aggregate effect recomputed
    on each resample by the same rule that made it:

    * ``base``/``source`` given (normalised effects, ``per_pair[i] = (patched_i - base_i) / D``
      with ``D = mean(source) - mean(base)`` over all pairs): a resample's effect is
      ``mean_b(per_pair) * D / D_b``, ``D_b`` its own ``mean(source) - mean(base)``, i.e.
      ``(mean_b(patched) - mean_b(base)) / (mean_b(source) - mean_b(base))`` exactly as
      :func:`normalize` of the means;
    * otherwise (changes or raw values): ``mean_b(per_pair)``.

    Args:
        per_pair: ``[n_pairs, *cells]`` per-pair effects.
        base, source: ``[n_pairs]`` the metric on each pair's base and source run.
        level: coverage of the interval, in (0, 1).
        n_boot: number of resamples (≥ 100).
        seed: seed of the resampling (same seed, same interval).
        skip_missing: NaN marks a cell a pair does not have (causal tracing's position groups:
            a one-token subject has no middle tokens); a resample's mean of a cell is then over
            the drawn pairs that have it, and resamples drawing none of them are left out of
            its percentiles. Without it, NaN is an error.

    Returns:
        ``(lower, upper)``, each ``[*cells]`` float32.

    Raises:
        InvalidArgumentError: fewer than 2 pairs, ``level`` outside (0, 1), ``n_boot`` < 100,
            or ``base``/``source`` of the wrong length.
        NormalizationError: a resample's ``mean(source) - mean(base)`` is ~0 (the gap is not
            stable over pairs, so a normalised interval is undefined: use raw values).
    """
    if not 0.0 < level < 1.0:
        raise InvalidArgumentError(f"level must be in (0, 1) (e.g. 0.95), got {level!r}")
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 100:
        raise InvalidArgumentError(
            f"n_boot must be an int >= 100 (percentile intervals need many resamples), "
            f"got {n_boot!r}")
    n = int(per_pair.shape[0])
    if n < 2:
        raise InvalidArgumentError(
            f"a bootstrap interval needs at least 2 pairs, this result has {n}: run the method "
            "on a dataset (several prompt pairs)")
    if (base is None) != (source is None):
        raise InvalidArgumentError("give both base and source per-pair metrics, or neither")
    cells = per_pair.reshape(n, -1).double()
    gen = torch.Generator().manual_seed(int(seed))
    idx = torch.randint(n, (n_boot, n), generator=gen)
    # counts[b, i]: how often pair i is drawn in resample b; mean_b(x) = counts[b] @ x / n
    counts = torch.zeros(n_boot, n, dtype=torch.float64)
    counts.scatter_add_(1, idx, torch.ones(n_boot, n, dtype=torch.float64))
    factor = torch.ones(n_boot, dtype=torch.float64)
    if base is not None and source is not None:
        base_d, source_d = base.double().flatten(), source.double().flatten()
        if base_d.numel() != n or source_d.numel() != n:
            raise InvalidArgumentError(
                f"base and source need one value per pair ({n}), got {base_d.numel()} and "
                f"{source_d.numel()}")
        gap = source_d.mean() - base_d.mean()
        gaps = counts @ (source_d - base_d) / n  # [n_boot]
        scale = torch.maximum(torch.ones(()), torch.maximum(base_d.abs().max(),
                                                             source_d.abs().max()))
        if bool((gaps.abs() <= 1e-6 * scale).any()):
            raise NormalizationError(
                "cannot bootstrap a normalised interval: on some resamples of the pairs the "
                "metric's source - base gap is ~0. Use more pairs, or pass normalize=False to "
                "the method for raw values")
        factor = gap / gaps
    alpha = (1.0 - level) / 2.0
    q = torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64)
    lower = torch.empty(cells.shape[1], dtype=torch.float64)
    upper = torch.empty_like(lower)
    step = max(1, _QUANTILE_ELEMENTS // n_boot)  # torch.quantile's input-size limit
    for start in range(0, cells.shape[1], step):
        chunk = cells[:, start:start + step]
        if skip_missing:
            have = ~torch.isnan(chunk)
            means = (counts @ torch.where(have, chunk, 0.0)) / (counts @ have.double())
            means = means * factor[:, None]  # 0/0 = NaN: a resample without the cell
            lower[start:start + step], upper[start:start + step] = torch.nanquantile(
                means, q, dim=0)
            continue
        means = counts @ chunk / n * factor[:, None]  # [n_boot, chunk]
        lower[start:start + step], upper[start:start + step] = torch.quantile(means, q, dim=0)
    if not bool(torch.isfinite(lower).all() and torch.isfinite(upper).all()):
        raise NonFiniteError("the bootstrap interval is not finite: the per-pair effects hold "
                             "NaN or inf")
    shape = per_pair.shape[1:]
    return lower.reshape(shape).float(), upper.reshape(shape).float()
