"""``InterpretableModel``: :class:`~causalpatch.model.HookedModel` plus the seeds' helpers.

The helpers are thin calls of the methods, so that the model layer below never calls upward::

    model = InterpretableModel("smollm2")
    results = model.activation_patching("Paris is the capital of France",
                                        "London is the capital of France", component="mlp")
    with model.causal_trace(clean, corrupted) as ct:
        ct.patch("layers.5.mlp")
        effect = ct.metric("l2")

Every helper picks the metric by the one rule of :func:`causalpatch.plan.choose_metric`: the
one given, else the dataset's, else ``logit_diff`` when answer tokens are given, else ``l2``.

Two more spellings from other libraries:

* TransformerLens: ``model.run_with_hooks(prompts, fwd_hooks=[(name, fn)])``, each
  ``fn(activation, hook)`` seeing ``hook.name`` and returning a replacement or ``None``
  (:meth:`InterpretableModel.run_with_hooks`).
* nnsight: the Hugging Face module tree by attribute, ``model.transformer.h[3].output[0]``,
  ``model.lm_head.output``, ``layer.attn.c_proj.input[0][0]`` inside ``with model.trace(...)``
  (:class:`ModuleEnvoy`): reads are the pass's values and writes take effect exactly as the
  equivalent intervention, through the same trace as ``model.layers[i].output``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from .datasets import as_patching_dataset
from .enums import Direction, Engine
from .errors import InvalidArgumentError, InvalidTypeError, UnknownComponentError
from .hooks import Hook
from .methods.activation_patching import CausalTrace, activation_patching
from .model import HookedModel
from .names import hook_name_for_site
from .tokens import Prompts, make_batch, token_lists
from .tracing import WRITE_FORMS

if TYPE_CHECKING:
    from .result import PatchingResult


class LayerRecovery(dict):
    """``{layer: recovery_percent}`` from :meth:`InterpretableModel.activation_patching`.

    A plain ``dict`` (``sorted(results.items(), ...)`` as in the seeds) that also keeps
    ``result`` (the :class:`~causalpatch.result.PatchingResult`) and ``figure`` (the
    matplotlib figure when ``plot=True``, else ``None``).
    """

    result: PatchingResult
    figure: Any = None


class InterpretableModel(HookedModel):
    """A Hugging Face causal LM ready for patching experiments (see :class:`HookedModel`)."""

    def activation_patching(self, clean_text: Prompts | Any, corrupted_text: Prompts | None = None,
                            component: str = "mlp", metric: Any = None, plot: bool = False,
                            **kwargs: Any) -> LayerRecovery:
        """Per-layer recovery in percent, ``{layer: recovery_percent}`` (the seeds' helper).

        Args:
            clean_text, corrupted_text: the prompts, or a dataset as ``clean_text`` (a
                :class:`~causalpatch.datasets.PatchingDataset`, also the seeds' subclass
                pattern with ``get_clean_corrupt_pairs``).
            component: a per-layer component (``"mlp"``, ``"attn"``, ``"resid_post"`` ...).
            metric: default by the one rule: the dataset's metric, else ``logit_diff`` when
                answers are given (``correct=``/``incorrect=`` or ``metric_kwargs``), else ``l2``.
            plot: build the bar chart: kept as ``results.figure`` and displayed (inline in a
                notebook; with pyplot's backend elsewhere).
            kwargs: passed to :func:`causalpatch.activation_patching`.

        Returns:
            :class:`LayerRecovery` (a dict with ``.result`` and ``.figure``).
        """
        result = activation_patching(self, as_patching_dataset(clean_text, self), corrupted_text,
                                     component=component, metric=metric, **kwargs)
        matrix, layers = result.effect_matrix, result.layers
        if matrix.dim() != 1 or layers is None:
            raise InvalidArgumentError(
                f"model.activation_patching returns one value per layer, but component="
                f"{component!r} gives axes {result.axes} of shape {tuple(matrix.shape)}; use "
                "causalpatch.activation_patching for per-head or per-position results")
        out = LayerRecovery({int(layer): float(v) * 100
                             for layer, v in zip(layers, matrix.tolist())})
        out.result = result
        if plot:
            out.figure = result.plot()
            _show(out.figure)
        return out

    def causal_trace(self, clean: Prompts | Any, corrupted: Prompts | None = None,
                     direction: str | Direction = "denoise",
                     engine: str | Engine = "fast") -> CausalTrace:
        """A context for multi-site patches: ``ct.patch(name)`` then ``ct.metric(...)``.

        ``direction="noise"`` patches corrupted activations into the clean run. ``clean`` may
        be a dataset (also the seeds' ``get_clean_corrupt_pairs`` pattern).
        """
        return CausalTrace(self, as_patching_dataset(clean, self), corrupted,
                           direction=direction, engine=engine)

    # -- TransformerLens: run_with_hooks -------------------------------------------------------
    def run_with_hooks(self, prompts: Prompts, fwd_hooks: Sequence[Any] = (), *,
                       hooks: Sequence[Any] | None = None, bwd_hooks: Sequence[Any] = (),
                       return_type: str | None = "logits", **ignored: Any) -> torch.Tensor | None:
        """One forward pass with TransformerLens-style hooks; returns the logits.

        Args:
            prompts: a string, a list of strings (right-padded batch) or token ids.
            fwd_hooks: ``[(name, fn), ...]``. ``name`` is any component name
                (``blocks.3.hook_resid_post``, ``blocks.3.attn.hook_z``, ``blocks.3.mlp``, a raw
                module path) or a filter ``name -> bool`` called with every TransformerLens hook
                name. ``fn(activation, hook)`` gets the canonical activation
                (``[batch, pos, d_model]``; ``[batch, pos, head, d_head]`` for ``attn.z``) and
                ``hook`` with ``hook.name`` (the name as given, or the TransformerLens name for
                a filter), and returns a replacement of the same shape, or ``None`` (or the
                activation itself) for no change. Hooks on one site run in list order.
            hooks: the same list under another name; a bare ``fn`` (no name) in either list is
                called at every component (but attention patterns) and tells them apart by
                ``hook.name``.
            bwd_hooks: not supported (must be empty): use
                :func:`causalpatch.attribution_patching` for gradients.
            return_type: ``"logits"`` (default) or ``None``.
            ignored: TransformerLens's ``reset_hooks_end`` / ``clear_contexts`` are accepted and
                have nothing to do (hooks never outlive the call); any other keyword is refused.

        Returns:
            Logits ``[batch, pos, vocab]`` (``None`` with ``return_type=None``). Every hook is
            removed when the pass ends, also when a hook raises.

        Raises:
            UnknownComponentError: a name names nothing; InvalidArgumentError / InvalidTypeError:
            a malformed entry. Both before any forward pass.
        """
        if bwd_hooks:
            raise InvalidArgumentError(
                "run_with_hooks(bwd_hooks=...) is not supported: backward hooks are for "
                "gradients; use causalpatch.attribution_patching, or torch autograd on "
                "model.hf_model")
        if return_type not in ("logits", None):
            raise InvalidArgumentError(
                f"return_type must be 'logits' or None, got {return_type!r}")
        if ignored:
            unknown = sorted(k for k in ignored if k not in ("reset_hooks_end", "clear_contexts"))
            if unknown:
                raise InvalidArgumentError(
                    f"run_with_hooks got unknown keyword(s) {unknown}; it takes prompts, "
                    "fwd_hooks=[(name, fn)], hooks=, return_type=")
        entries = list(fwd_hooks) + list(hooks or ())
        planned = [h for entry in entries for h in self._tl_hooks(entry)]
        batch = make_batch(token_lists(self, prompts), self.pad_token_id, self.device)
        with torch.no_grad():
            logits = self.forward(batch, planned)
        return logits if return_type == "logits" else None

    def _tl_hooks(self, entry: Any) -> list[Hook]:
        """The :class:`~causalpatch.hooks.Hook` objects of one ``run_with_hooks`` entry."""
        if callable(entry) and not isinstance(entry, (tuple, list)):
            return [self._tl_hook(n, hook_name_for_site(n), entry) for n in self._tl_sites()]
        if not isinstance(entry, (tuple, list)) or len(entry) != 2 or not callable(entry[1]):
            raise InvalidTypeError(
                f"each hook must be a (name, fn) pair with fn(activation, hook), or a bare fn; "
                f"got {entry!r}")
        name, fn = entry
        if isinstance(name, str):
            return [self._tl_hook(name, name, fn)]
        if callable(name):
            return [self._tl_hook(n, hook_name_for_site(n), fn) for n in self._tl_sites()
                    if name(hook_name_for_site(n))]
        raise InvalidTypeError(
            f"a hook's name must be a string or a filter name -> bool, got {name!r}")

    def _tl_sites(self) -> list[str]:
        return [n for n in self.component_names() if not n.endswith(".attn.pattern")]

    def _tl_hook(self, name: str, shown: str, fn: Callable[..., Any]) -> Hook:
        point = HookPoint(shown, self.site(name).layer)

        def run(act: torch.Tensor) -> torch.Tensor | None:
            out = fn(act, point)
            return None if out is None or out is act else out

        return Hook(self.site(name), run)

    # -- nnsight: the Hugging Face module tree -------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        """``model.transformer`` / ``model.model`` / ``model.lm_head``...: a child module of the
        Hugging Face model, as a :class:`ModuleEnvoy` (nnsight's spelling)."""
        hf = self.__dict__.get("hf_model")
        if name.startswith("_") or hf is None or name not in dict(hf.named_children()):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return ModuleEnvoy(self, name)


class HookPoint:
    """What a :meth:`InterpretableModel.run_with_hooks` hook function gets as ``hook``."""

    def __init__(self, name: str, layer: int | None) -> None:
        self.name = name
        self._layer = layer

    def layer(self) -> int | None:
        """The decoder layer of the hooked site (``None`` outside the layers)."""
        return self._layer

    def __repr__(self) -> str:
        return f"HookPoint({self.name!r})"


class Values(tuple):
    """A module's output or input as nnsight shows it: a tuple whose tensor elements are traced
    values (writes through them take effect). The tuple itself cannot be written."""

    path: str

    def __new__(cls, items: Sequence[Any], path: str) -> Values:
        out = super().__new__(cls, items)
        out.path = path
        return out

    def save(self) -> Values:
        """The tuple itself (its tensors are already computed)."""
        return self

    def __getitem__(self, key: Any) -> Any:
        if not isinstance(key, (int, slice)):
            raise InvalidArgumentError(
                f"{self.path} is a tuple of {len(self)} as in nnsight (index it first: "
                f"{self.path}[0] is the tensor), so [{_key_text(key)}] cannot index it; write "
                f"{self.path}[0][:, p] = x")
        return super().__getitem__(key)

    def __setitem__(self, key: Any, value: Any) -> None:
        where = ":" if isinstance(key, int) else _key_text(key)
        raise InvalidArgumentError(
            f"{self.path}[{_key_text(key)}] = ... cannot take effect: {self.path} is a tuple; "
            f"write into its tensor instead, {self.path}[0][{where}] = x (forms: {WRITE_FORMS})")


class Kwargs(dict):
    """The keyword arguments of nnsight's ``(args, kwargs)`` input: not recorded, so empty and
    read-only (a write would change nothing)."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def __setitem__(self, key: Any, value: Any) -> None:
        raise InvalidArgumentError(
            f"{self.path}[1][{key!r}] = ... would change nothing: only the first positional "
            f"argument is recorded; write it instead, {self.path}[0][0][:] = x")


def _key_text(key: Any) -> str:
    keys = key if isinstance(key, tuple) else (key,)
    return ", ".join(":" if k == slice(None) else repr(k) for k in keys)


class ModuleEnvoy:
    """A sub-module of the Hugging Face model by attribute path, read as in nnsight.

    ``model.transformer.h[3]`` (GPT-2), ``model.model.layers[3]`` (LLaMA), ``model.lm_head``;
    ``len()`` and iteration work on module lists, other attributes (``.weight``) are the
    module's own. Inside ``with model.trace(...)``:

    * ``.output`` is the module's output. A decoder layer and an attention module give a
      tuple whose element 0 is the hidden state (``[batch, pos, d_model]``), as the
      ``transformers`` modelling code that nnsight recipes were written against returned
      (the other elements are not recorded); every other module gives its tensor.
    * ``.input`` (also ``.inputs``) is ``((first_argument,), {})``, nnsight's ``(args, kwargs)``
      form (``c_proj.input[0][0]`` is the flat per-head input ``[batch, pos, n_heads *
      d_head]``); only the first argument is recorded.
    * Writes (``.output[0][:] = x``, ``.output[0][:, p] = x``,
      ``.input[0][0][:, :, a:b] = x``, ``.output = x``) are recorded by the trace exactly as
      ``model.layers[i].output[:] = x`` is (:class:`~causalpatch.tracing.TracedTensor`).
    """

    _model: InterpretableModel
    path: str

    def __init__(self, model: InterpretableModel, path: str) -> None:
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "path", path)

    @property
    def module(self) -> nn.Module:
        """The real ``nn.Module``."""
        return self._model.hf_model.get_submodule(self.path)

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("_"):
            raise AttributeError(attr)
        value = getattr(self.module, attr)  # AttributeError as the module raises it
        return ModuleEnvoy(self._model, f"{self.path}.{attr}") \
            if isinstance(value, nn.Module) else value

    def __len__(self) -> int:
        return len(self.module)  # type: ignore[arg-type]  # ModuleList/Sequential; else TypeError

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(len(self))[i]]
        if isinstance(i, bool) or not hasattr(i, "__index__"):
            raise InvalidTypeError(f"{self.path}[...] takes an int, got {type(i).__name__}")
        n = len(self)
        j = int(i) + n if int(i) < 0 else int(i)
        if not 0 <= j < n:
            raise IndexError(f"{self.path}[{int(i)}] is out of range: it has {n} modules")
        return ModuleEnvoy(self._model, f"{self.path}.{j}")

    def __iter__(self) -> Iterator[ModuleEnvoy]:
        return (self[j] for j in range(len(self)))

    def _tuple_output(self) -> bool:
        site = self._model.site(self.path)
        return site.kind in ("resid_post", "attn.raw") or (
            site.kind == "attn" and "attn.raw" not in self._model.adapter.sites)

    @property
    def output(self) -> Any:
        """The module's output in the open trace (see the class docstring)."""
        tr = self._model.open_trace(f"{self.path}.output")
        try:
            value = tr.value(self.path)
        except (KeyError, UnknownComponentError) as exc:
            raise InvalidArgumentError(
                f"{self.path}.output has no tensor value in the forward pass ({exc}); read a "
                "module that returns a tensor, e.g. a decoder layer or its attention/MLP"
            ) from None
        return Values((value,), f"{self.path}.output") if self._tuple_output() else value

    @property
    def input(self) -> Values:
        """``((first_argument,), {})`` in the open trace (see the class docstring)."""
        tr = self._model.open_trace(f"{self.path}.input")
        name = f"{self.path}.input"
        return Values((Values((tr.value(name),), f"{name}[0]"), Kwargs(name)), name)

    inputs = input

    def __setattr__(self, attr: str, value: Any) -> None:
        """``.output = x`` / ``.input = x`` replace the value (a tensor, or nnsight's tuple form
        with the tensor first); any other assignment is refused (it would change nothing)."""
        if attr not in ("output", "input", "inputs"):
            raise InvalidArgumentError(
                f"{self.path}.{attr} = ... would change nothing: modules cannot be replaced or "
                f"given attributes through the module tree. Write a value inside `with "
                f"model.trace(...)` instead: {WRITE_FORMS}")
        name = self.path if attr == "output" else f"{self.path}.input"
        tensor = value
        if attr != "output" and isinstance(value, tuple) and len(value) == 2 \
                and isinstance(value[1], dict):
            tensor = value[0]  # (args, kwargs)
        if isinstance(tensor, (tuple, list)):
            if len(tensor) != 1:
                raise InvalidArgumentError(
                    f"{self.path}.{attr} = (...) of {len(tensor)} elements: only the first "
                    f"(the tensor) is recorded here; assign (x,) or x")
            tensor = tensor[0]
        if not isinstance(tensor, torch.Tensor):
            raise InvalidTypeError(
                f"{self.path}.{attr} = value needs a tensor (or (x,)), got "
                f"{type(value).__name__}")
        self._model.open_trace(f"{self.path}.{attr}").assign(name, tensor)

    def __repr__(self) -> str:
        return f"ModuleEnvoy({self.path!r}: {type(self.module).__name__})"


def _show(figure: Any) -> None:
    """Display ``figure``: inline in a Jupyter kernel, else with pyplot's backend (nothing,
    and no warning, with a non-interactive backend such as Agg)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") \
        else None
    if shell is not None and getattr(shell, "kernel", None) is not None:
        from IPython.display import display

        display(figure)
        return
    import matplotlib

    if matplotlib.get_backend().lower() in _NON_INTERACTIVE:
        return  # a script without a display: the figure is in results.figure
    figure.show(warn=False)


_NON_INTERACTIVE = {"agg", "pdf", "ps", "svg", "pgf", "cairo", "template"}
