"""Task datasets: many clean/corrupted prompt pairs with answer tokens.

Every dataset is a :class:`PatchingDataset`: four lists aligned by index,

* ``clean[i]`` / ``corrupted[i]`` — prompts (strings, or token-id lists for
  :class:`InductionDataset`) with the **same token length** pairwise,
* ``correct[i]`` / ``incorrect[i]`` — answer token ids (``int``),

so it can be passed wherever a single clean/corrupted pair is accepted, e.g.
``activation_patching(model, dataset, ...)``; the dataset's ``metric`` is used unless another
one is given.

* :class:`IOIDataset` — indirect object identification (Wang et al., 2022).
* :class:`FactualRecallDataset` — subject swaps within a relation of the ROME "known facts"
  (Meng et al., 2022); :func:`known_facts` lists the facts a model gets right.
* :class:`GreaterThanDataset` — "The war lasted from the year 1732 to the year 17"
  (Hanna et al., 2023), with :func:`greater_than_metric`.
* :class:`InductionDataset` — a random token sequence repeated twice.

Example::

    from causalpatch import InterpretableModel, activation_patching
    from causalpatch.datasets import IOIDataset
    model = InterpretableModel("smollm2")
    ioi = IOIDataset(model, n=16, seed=0)
    ioi[0]     # PatchingPair(clean='When ... John gave a drink to', corrupted=..., ...)
    result = activation_patching(model, ioi, component="attn_head")

The package, one idea a module (every name above is importable from here):

* :mod:`.protocol` — the seeds' protocol (``get_clean_corrupt_pairs`` ...): the three methods
  every dataset has, seeds'-style subclasses, :func:`seed_metric`;
* :mod:`.base` — :class:`PatchingDataset`, :class:`PatchingPair`, :func:`as_patching_dataset`
  and the helpers the tasks share;
* :mod:`.roles` — position roles (:func:`token_roles`, :func:`dataset_roles`);
* one module per task: :mod:`.ioi`, :mod:`.factual`, :mod:`.greater_than`, :mod:`.induction`.
"""

from .base import PatchingDataset, PatchingPair
from .base import as_patching_dataset as as_patching_dataset
from .factual import FactualRecallDataset, KnownFact, known_facts, load_known_facts
from .factual import KnownFraction as KnownFraction
from .factual import known_fraction as known_fraction
from .greater_than import GT_NOUNS as GT_NOUNS
from .greater_than import GreaterThanDataset, greater_than_metric
from .induction import InductionDataset
from .ioi import IOI_NAMES, IOI_TEMPLATES, IOIDataset
from .ioi import IOI_OBJECTS as IOI_OBJECTS
from .ioi import IOI_PLACES as IOI_PLACES
from .protocol import seed_metric as seed_metric
from .roles import NO_ROLE as NO_ROLE
from .roles import dataset_roles, token_roles

__all__ = ["FactualRecallDataset", "GreaterThanDataset", "IOIDataset", "IOI_NAMES",
           "IOI_TEMPLATES", "InductionDataset", "KnownFact", "PatchingDataset", "PatchingPair",
           "dataset_roles", "greater_than_metric", "known_facts", "load_known_facts",
           "token_roles"]
