"""Translation as a :class:`~cenfusion.engine.task.Task`: its settings, its recipe built and
checked, and what ``cen info`` reads from its checkpoints."""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

from cenfusion.data.taskonomy import DOMAINS
from cenfusion.engine.checkpoint import load_weights
from cenfusion.engine.task import KEPT_FOR_SCORING, KEPT_FOR_TRAINING, ModelSummary, Task
from cenfusion.engine.trainer import Context
from cenfusion.errors import CenError
from cenfusion.models.patchgan import PatchGANConfig
from cenfusion.models.unet import CENUNetConfig
from cenfusion.reporting.html import write_report
from cenfusion.reporting.plots import write_plots
from cenfusion.reporting.runlog import RunKind
from cenfusion.translation.build import datasets
from cenfusion.translation.config import TranslationConfig
from cenfusion.translation.modelio import TASK, generator_from_record
from cenfusion.translation.train import TranslationRecipe

#: The side ``cen info`` counts FLOPs at when a checkpoint does not give its crop size.
INFO_SIDE = 256


def build_recipe(
    cfg: TranslationConfig,
    ctx: Context,
    state: dict[str, Any] | None,
    where: str,
    training: bool,
) -> TranslationRecipe:
    """The checkpoint's networks and domains checked against the settings, then data and
    networks, the generator with the checkpoint's weights."""
    if state is not None:
        _check_checkpoint(cfg, state, where, training)
    train_set, val_set = datasets(cfg, training)
    if cfg.fid and len(val_set) < 2:
        raise CenError(
            f"--fid: {val_set.root / 'val.txt'} lists {len(val_set)} view; FID and KID need at "
            "least 2 (add views, or --no-fid)"
        )
    if train_set is not None and len(train_set) < cfg.batch_size * ctx.dist.world_size:
        raise CenError(
            f"--batch-size {cfg.batch_size}: {train_set.root / 'train.txt'} lists "
            f"{len(train_set)} views, fewer than one batch per process"
        )
    train = ctx.train_loader(train_set, cfg, drop_last=False) if train_set is not None else None
    recipe = TranslationRecipe(cfg, ctx, (train, ctx.loader(val_set, cfg)))
    if state is not None:
        load_weights(recipe.generator, state["model"], where)
    return recipe


def _check_checkpoint(
    cfg: TranslationConfig, state: dict[str, Any], where: str, training: bool
) -> None:
    """Refuse settings that contradict the checkpoint (a resumed or evaluated run keeps its
    model and its domains), naming both values, before anything is written: the generator's
    shape, the discriminator's width when training goes on, and the domains it learnt."""
    generator = CENUNetConfig.from_dict(state["model_config"])
    kept = KEPT_FOR_TRAINING if training else KEPT_FOR_SCORING
    checks = [
        ("--img-types (inputs)", len(cfg.inputs), "generator", generator.num_modalities),
        ("--ngf", cfg.ngf, "generator", generator.ngf),
        ("--num-downs", cfg.num_downs, "generator", generator.num_downs),
        ("--threshold", cfg.threshold, "generator", generator.threshold),
    ]
    if training and "discriminator_config" in state:
        ndf = PatchGANConfig.from_dict(state["discriminator_config"]).ndf
        checks.append(("--ndf", cfg.ndf, "discriminator", ndf))
    for flag, ours, network, theirs in checks:
        if ours != theirs:
            raise CenError(f"{flag} {ours}: the {network} of {where} has {theirs}; {kept}")
    learnt = (state.get("config") or {}).get("img_types")
    if learnt is not None and tuple(learnt) != cfg.img_types:
        named = " + ".join(DOMAINS[t] for t in learnt[:-1]) + f" -> {DOMAINS[learnt[-1]]}"
        raise CenError(
            f"--img-types {' '.join(map(str, cfg.img_types))}: {where} was trained on "
            f"{' '.join(map(str, learnt))} ({named}); its branches keep their domains"
        )


def summarize(state: dict[str, Any], where: str) -> ModelSummary:
    """The checkpoint's generator, its input and target domains, and the epoch it was saved
    at."""
    model = generator_from_record(state, where)
    config = state.get("config") or {}
    names = [DOMAINS[t] if 0 <= t < len(DOMAINS) else None for t in config.get("img_types", [])]
    modalities = [n for n in names[:-1] if n is not None]
    side = int(config.get("crop_size", INFO_SIDE))
    progress = f"epoch {state['epoch']}" if "epoch" in state else None
    target = names[-1] if names else None
    return ModelSummary(model, modalities, (), (side, side), progress, target)


def head_names(config: Mapping[str, Any], count: int) -> list[str] | None:
    """The input domains of ``img_types`` (all but the last), then the ensemble."""
    types = config.get("img_types")
    if not isinstance(types, list) or len(types) != count:
        return None
    if not all(isinstance(t, int) and 0 <= t < len(DOMAINS) for t in types[:-1]):
        return None
    return [DOMAINS[t] for t in types[:-1]] + ["ensemble"]


#: What a report says of a translation run.
RUN_KIND = RunKind("image-to-image translation", head_names)


def default_preset(flags: Mapping[str, Any]) -> str:
    return "released"


TRANSLATION = Task(
    name=TASK,
    config=TranslationConfig,
    presets={"released": TranslationConfig()},
    default_preset=default_preset,
    build_recipe=build_recipe,
    summarize=summarize,
    after_validation=partial(write_plots, kind=RUN_KIND),
    write_report=partial(write_report, kind=RUN_KIND),
)
