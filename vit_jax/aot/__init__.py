"""Compile for the pod before booking it: the train and eval steps of a config, compiled on this CPU by the real TPU
and GPU compilers for a topology that is not here (deviceless ahead-of-time compilation).

    python -m vit_jax.aot --config configs/vit_b16.py --topology v5p-64 [--config.field=value ...] [--json OUT]

``targets`` (chips and topology names), ``compilers`` (the compilers' own environment), ``compile`` (the steps as
``vit_jax.main`` builds them, compiled, and the compiler's plan read back), ``hlo`` (collectives), ``report`` (the
printed report, remedies and the plan search). Anchors: MaxText's ``train_compile.py``, axlearn's
``run_aot_compilation.py``.
"""
