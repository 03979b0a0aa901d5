"""The methods: each a short module on the shared ``plan -> engine -> assemble`` pipeline.

* :mod:`.activation_patching` — sweeps over layers x positions x heads x neurons, and
  :class:`~.activation_patching.CausalTrace` for several patches at once.
* :mod:`.attribution` — attribution patching, the first-order estimate of every patch.
* :mod:`.ablation` — zero, mean and resample ablations.
* :mod:`.path_patching` — path patching (Wang et al., 2022): a sender's effect through the
  direct path into receivers.
* :mod:`.causal_tracing` — ROME causal tracing (Meng et al., 2022): noise the subject, restore
  one state per layer x position.
* :mod:`.lens` — the logit lens (every layer x position through the final norm and the
  unembedding) and direct logit attribution (each residual write's exact share of the logit
  difference).

Methods never import each other; what two methods share lives lower in the pipeline.
"""

from .lens import DLAResult, LensResult, direct_logit_attribution, logit_lens

__all__ = ["DLAResult", "LensResult", "direct_logit_attribution", "logit_lens"]
