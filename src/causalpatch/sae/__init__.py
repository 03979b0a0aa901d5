"""Sparse autoencoders (SAEs): the SAE, the SAELens on-disk format, the exact splice into a
forward pass, and training on offline text.

An SAE reads a site's activation ``x`` ``[..., d_in]``, encodes it into sparse feature
activations ``f`` ``[..., d_sae]`` and decodes them back. Attached to a trace
(``model.trace(..., saes=[sae])``) it is spliced in exactly (``x + decode(f') - decode(f)``),
and its values become names: ``{site}.sae.features`` ``[batch, pos, d_sae]``,
``{site}.sae.error`` and so on, to cache and to intervene on.

The package, by idea (every public name is importable from ``causalpatch.sae``):

* :mod:`~causalpatch.sae.model` -- :class:`SparseAutoencoder` (the SAELens maths),
  :func:`wrap_sae` for any ``encode``/``decode`` object, :func:`bind_sae` and
  :class:`BoundSAE` (an SAE attached to one site of one model). Rank 6.
* :mod:`~causalpatch.sae.format` -- :func:`load_sae` / :func:`save_sae`: SAELens folders
  (``cfg.json`` + ``sae_weights.safetensors``; nothing is ever unpickled). Rank 6.
* :mod:`~causalpatch.sae.splicing` -- the exact splice (:func:`splice`), the value names, the
  trace's splice set (:func:`attach_saes`), feature edits (:func:`edit_features`,
  :func:`feature_edit_values`) and :func:`features_component` for the methods. Rank 6.
* :mod:`~causalpatch.sae.checkpoint` -- what ``train_sae(checkpoint=...)`` keeps (settings,
  activations, training state; JSON and safetensors) to continue an interrupted run. Rank 6.
* :mod:`~causalpatch.sae.train` -- :func:`train_sae` and its parts (training text,
  activations, fitting, evaluation, :func:`top_activations`). It runs the model, so it ranks
  with the methods (17).

The TransformerLens hook names SAELens configs use (``blocks.8.hook_resid_post``) are part of
:mod:`causalpatch.names`; :func:`site_for_hook_name` adds the SAE's checks and messages.

**Why the training names are lazy.** Importing this package imports the rank-6 modules only,
so the core (``tracing``, ``model``) may depend on it. The names of :mod:`~causalpatch.sae.train`
(:func:`train_sae`, :func:`training_texts`, ...) are still importable from here: a module-level
``__getattr__`` (PEP 562) imports ``causalpatch.sae.train`` on first use, exactly like the root
package resolves its names. That import happens only when a user asks for a training name, never
when causalpatch's own modules load, so it adds no dependency of rank 6 on rank 17. Code inside
causalpatch imports ``causalpatch.sae.train`` explicitly, so the architecture test sees the edge.

Example::

    from causalpatch import InterpretableModel
    from causalpatch.sae import load_sae
    model = InterpretableModel("smollm2")
    sae = load_sae("tests/data/saes/smollm2-blocks.20.resid_post-topk-2048")
    with model.trace("When Mary and John went to the store, John gave a drink to", saes=[sae],
                     cache=["blocks.20.resid_post.sae.features"]) as tr:
        f = tr.cache["blocks.20.resid_post.sae.features"]   # [1, 14, 2048]
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# `X as X`: importable from here as from the old sae.py module, but not in __all__.
from ..names import TL_GLOBAL_HOOKS as TL_GLOBAL_HOOKS, TL_LAYER_HOOKS as TL_LAYER_HOOKS
from ..names import hook_name_for_site
from .format import SAE_CFG_FILENAME as SAE_CFG_FILENAME
from .format import SAE_WEIGHTS_FILENAME as SAE_WEIGHTS_FILENAME
from .format import SPARSITY_FILENAME as SPARSITY_FILENAME
from .format import SAENotFoundError, load_sae, save_sae
from .model import SAE_SITE_KINDS as SAE_SITE_KINDS
from .model import SAELENS_FORMAT_VERSION as SAELENS_FORMAT_VERSION
from .model import same_model as same_model
from .model import (ARCHITECTURES, BoundSAE, SAEFormatError, SAEModelMismatchWarning,
                    SparseAutoencoder, WrappedSAE, bind_sae, bind_saes, site_for_hook_name,
                    wrap_sae)
from .splicing import EDITABLE_LEAVES as EDITABLE_LEAVES, SAE_LEAVES as SAE_LEAVES
from .splicing import SAELENS_LEAVES as SAELENS_LEAVES
from .splicing import (FeatureEdit, SAESplice, SAESplices, attach_saes, edit_features,
                       feature_edit_values, features_component, lookup_sae, splice,
                       split_sae_name)

#: Names defined by :mod:`causalpatch.sae.train`, imported on first use (see above).
TRAINING_NAMES = frozenset({
    "SINK_NORM_FACTOR", "TrainingReport", "collect_activations", "evaluate_sae", "fit_sae",
    "ordinary_tokens", "token_sequences", "top_activations", "train_sae", "training_texts",
})


def __getattr__(name: str) -> Any:
    """A name of :mod:`causalpatch.sae.train` (or the submodule itself), imported on first use."""
    if name in TRAINING_NAMES or name == "train":
        train = importlib.import_module(f"{__name__}.train")
        value = train if name == "train" else getattr(train, name)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | TRAINING_NAMES)


if TYPE_CHECKING:  # for type checkers and IDEs; never executed
    from .train import SINK_NORM_FACTOR as SINK_NORM_FACTOR
    from .train import ordinary_tokens as ordinary_tokens
    from .train import (TrainingReport, collect_activations, evaluate_sae, fit_sae,
                        token_sequences, top_activations, train_sae, training_texts)

__all__ = [
    "ARCHITECTURES", "BoundSAE", "FeatureEdit", "SAEFormatError", "SAEModelMismatchWarning",
    "SAENotFoundError", "SAESplice", "SAESplices", "SparseAutoencoder", "TrainingReport",
    "WrappedSAE", "attach_saes", "bind_sae",
    "bind_saes", "collect_activations", "edit_features", "evaluate_sae", "features_component",
    "feature_edit_values", "fit_sae", "hook_name_for_site", "lookup_sae", "splice",
    "load_sae", "save_sae", "site_for_hook_name", "split_sae_name", "top_activations",
    "token_sequences", "train_sae", "training_texts", "wrap_sae",
]
