"""The methods: each a short module on the shared ``plan -> engine -> assemble`` pipeline.

* :mod:`.activation_patching` — sweeps over layers x positions x heads x neurons, and
  :class:`~.activation_patching.CausalTrace` for several patches at once.
* :mod:`.attribution` — attribution patching, the first-order estimate of every patch.
* :mod:`.ablation` — zero, mean and resample ablations.

Methods never import each other; what two methods share lives lower in the pipeline.
"""
