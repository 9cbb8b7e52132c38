"""Multimodal image-to-image translation (CEN_SPEC §3): run config, training, evaluation, CLI.

``config.TranslationConfig`` describes a run; ``train.train`` / ``train.evaluate_run`` execute
it; ``command`` adds the ``cen i2i`` and ``cen data taskonomy`` subcommands.
"""
