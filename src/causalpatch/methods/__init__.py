"""The methods: each a short module on the shared ``plan -> engine -> assemble`` pipeline.

* :mod:`.activation_patching` — sweeps over layers x positions x heads x neurons, and
  :class:`~.activation_patching.CausalTrace` for several patches at once.
* :mod:`.attribution` — attribution patching, the first-order estimate of every patch.
* :mod:`.ablation` — zero, mean and resample ablations.
* :mod:`.path_patching` — path patching (Wang et al., 2022): a sender's effect through the
  direct path into receivers.
* :mod:`.causal_tracing` — ROME causal tracing (Meng et al., 2022): noise the subject, restore
  one state per layer x position.

Methods never import each other; what two methods share lives lower in the pipeline.
"""
