"""Multimodal image-to-image translation (CEN paper, Sec. 4.2): run config, training, evaluation, CLI.

``config.TranslationConfig`` describes a run; ``train.train`` / ``evaluate.evaluate_run`` execute
it; ``command`` adds the ``cen i2i`` and ``cen data taskonomy`` subcommands.
"""
