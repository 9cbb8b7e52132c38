"""Multimodal image-to-image translation (CEN paper, Sec. 4.2): run config, training, evaluation, CLI.

``config.TranslationConfig`` describes a run; ``task.TRANSLATION`` is the task that the
engine's ``session.train`` and ``session.evaluate`` run; ``command`` adds the ``cen i2i`` and
``cen data taskonomy`` subcommands.
"""
