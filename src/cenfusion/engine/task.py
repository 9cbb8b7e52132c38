"""The contract between a task and the rest of the package: what the engine, ``cen info`` and
``cen report`` need to know of segmentation, translation or a task of one's own.

A task gives its checkpoint name, its config class and presets, how to build its
:class:`~cenfusion.engine.trainer.Recipe` from a config (and a checkpoint's state), and how to
summarise a checkpoint's model. The engine does the rest, once for every task: the settings
(:meth:`Task.resolve_config`), :func:`~cenfusion.engine.session.train` and
:func:`~cenfusion.engine.session.evaluate`. This module imports no torch, so that a registry
of tasks costs nothing to the ``cen`` command's start.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cenfusion.engine.config import config_from_dict, flag_name, load_yaml, replace_config
from cenfusion.errors import CenError

if TYPE_CHECKING:
    from torch import nn

    from cenfusion.engine.trainer import Context, Recipe


#: Why a setting that contradicts a checkpoint's model is refused, when training goes on
#: from it and when it is scored.
KEPT_FOR_TRAINING = "a resumed run keeps its model (start a new run for another one)"
KEPT_FOR_SCORING = "an evaluation scores the checkpoint's model as it is"


@dataclass(frozen=True)
class ModelSummary:
    """What ``cen info`` reads from a task's checkpoint: the model with its weights, the names
    of its modalities and classes (empty where they do not apply), the input size its FLOPs
    are counted at, how far its training went (None when the checkpoint does not say) and
    what a translation model outputs (None for segmentation)."""

    model: nn.Module
    modalities: Sequence[str]
    classes: Sequence[str]
    default_size: tuple[int, int]
    progress: str | None
    target: str | None = None


@dataclass(frozen=True)
class Task:
    """One task.

    ``presets`` are named starting settings; ``default_preset(flags)`` names the one a
    command starts from when none is asked for. ``build_recipe(cfg, ctx, state, where,
    training)`` returns the recipe of ``cfg`` on ``ctx`` with every setting, the data and
    (when ``state`` is a checkpoint's, read from ``where``) the checkpoint checked against
    each other, the model holding the checkpoint's weights; ``training=False`` builds what an
    evaluation needs (no training data). ``summarize(state, where)`` rebuilds a checkpoint's
    model for ``cen info``. ``after_validation(run_folder)`` redraws the run's plots;
    ``write_report(run_folder)`` writes its page (``cen report``) and returns its path.
    """

    name: str
    config: type
    presets: Mapping[str, Any]
    default_preset: Callable[[Mapping[str, Any]], str]
    build_recipe: Callable[[Any, Context, dict[str, Any] | None, str, bool], Recipe]
    summarize: Callable[[dict[str, Any], str], ModelSummary]
    after_validation: Callable[[Path], Any]
    write_report: Callable[[Path], Path]
    supersedes: Mapping[str, Sequence[str]] = field(default_factory=dict)
    """``{setting: others}``: a setting given (flag or YAML) without those others puts them
    back to their defaults, e.g. ``--enc`` a preset's ``backbone``, which would override it."""

    def resolve_config(
        self,
        preset: str | None,
        yaml_path: Path | None,
        flags: Mapping[str, Any],
        saved: Mapping[str, Any] | None = None,
        where: str = "checkpoint",
    ) -> Any:
        """A command's settings, by one rule for every task and command: the base is the
        config ``saved`` with the checkpoint the command continues or evaluates (read from
        ``where``), unless a preset is asked for; else the preset; then the YAML file; then
        the flags that were given.

        Raises:
            CenError: an empty flag (a shell's unset variable: ``--pretrained ""`` would
                read as no weights), an unknown preset, a setting of the wrong name or type,
                or settings that cannot run together (checked once all are in).
        """
        from_yaml = load_yaml(yaml_path) if yaml_path is not None else {}
        for source, given_here in (("", flags), (f" (set in --config {yaml_path})", from_yaml)):
            empty = [k for k, v in given_here.items() if isinstance(v, str) and not v.strip()]
            if empty:
                raise CenError(
                    f"{flag_name(empty[0])} {given_here[empty[0]]!r}: expected a value, got an "
                    f"empty one{source or ' (an unset variable?)'}"
                )
        if saved is not None and preset is None:
            base = config_from_dict(self.config, dict(saved), where)
        else:
            name = preset or self.default_preset(flags)
            if name not in self.presets:
                raise CenError(f"--preset {name}: expected one of {', '.join(self.presets)}")
            base = self.presets[name]
        given = {**from_yaml, **flags}
        defaults = {f.name: f.default for f in fields(self.config)}
        superseded = {
            other: defaults[other]
            for name, others in self.supersedes.items()
            if name in given
            for other in others
            if other not in given
        }
        if superseded:
            base = replace_config(base, superseded)
        if yaml_path is not None:
            base = replace_config(base, from_yaml, f"--config {yaml_path}")
        resolved = replace_config(base, dict(flags))
        try:
            resolved.validate()
        except CenError as err:
            raise _with_source(err, from_yaml, flags, yaml_path) from None
        return resolved


def _with_source(
    err: CenError, from_yaml: Mapping[str, Any], flags: Mapping[str, Any], path: Path | None
) -> CenError:
    """``err`` naming the YAML file when the setting it begins with came from there, not
    from a flag: the user typed no such flag."""
    text = str(err)
    named = [
        key
        for key in from_yaml
        if key not in flags and any(text.startswith(flag_name(key) + end) for end in " :,")
    ]
    return CenError(f"{text} (set in --config {path})") if named else err
