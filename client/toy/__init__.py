"""The toy world the demo, tests and transfer benchmark run in: symbolic tasks and a tiny transformer.

Modules: ``symbolic`` (``a OP b =`` over Z_p, vocabularies, deterministic splits; no torch), ``model``
(:class:`~m2kt.toy.model.TinyTransformer` and its config), ``adapter`` (how M2KT reads it), ``train``
(:func:`~m2kt.toy.train.train_tiny`, accuracy), ``checkpoint`` (save / load, safetensors + JSON),
``probes`` (probe inputs for operator concepts). This package sits above teacher and student: they
never import it; it brings its own adapter to the torch layer.
"""
