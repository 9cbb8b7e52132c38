"""The run sequences every task shares: train a config, evaluate a checkpoint, and the one
way a command turns its flags, YAML file, preset and checkpoint into settings."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cenfusion.engine.checkpoint import load_checkpoint, saved_config
from cenfusion.engine.files import FolderLock
from cenfusion.engine.run import (
    BEST,
    LAST,
    RunFolder,
    RunModeOptions,
    log,
    refuse_foreign_checkpoint,
    resume_path,
)
from cenfusion.engine.task import Task
from cenfusion.engine.trainer import BestScore, fit, prepare
from cenfusion.errors import CenError


def train(task: Task, cfg: Any, resume: Path | None = None, force: bool = False) -> BestScore:
    """Train ``cfg`` of ``task``: validate the settings, set up the process, read the checkpoint
    ``resume``, refuse a run folder it may not take (before the slow set-up), let the task
    build its recipe (data, model, checks), claim the run folder, train to the end of the
    schedule and log the best validation. A checkpoint that holds an epoch is continued (its
    run folder is this run's; a schedule ending before that epoch is refused); one with
    weights only (a converted released model) starts a new run from those weights. The
    task's reports are redrawn after every validation when ``cfg.plots`` is on.
    """
    with prepare(cfg) as ctx:
        state = load_checkpoint(resume, task=task.name) if resume is not None else None
        where = str(resume)
        continuing = state is not None and "epoch" in state
        if continuing and force:
            raise CenError(
                f"--force: not with --resume {where}, which continues its run; --force starts "
                "afresh (alone, or with --resume of weights only)"
            )
        if continuing:
            refuse_foreign_checkpoint(cfg.run_dir, Path(where), "continuing it")
        if ctx.dist.is_main:  # under DDP the main rank may hold it already: it alone probes
            FolderLock.refuse_if_held(cfg.run_dir)
        RunFolder.check_claim(cfg.run_dir, continuing, force)
        recipe = task.build_recipe(cfg, ctx, state, where, True)
        done, end = (int(state["epoch"]) if continuing else 0), recipe.num_epochs()
        if done > end:
            raise CenError(
                f"--epochs: the schedule ends at epoch {end}, before epoch {done} of {where}; "
                "a resumed run goes on to a later end"
            )
        folder = ctx.open_folder(cfg, resuming=continuing, force=force)
        log.info(recipe.start_line())
        report = task.after_validation if getattr(cfg, "plots", False) else None
        best = fit(recipe, cfg, folder, state if continuing else None, where, report)
        if (line := recipe.best_line(best)) is not None:
            log.info(line)
        return best


def checkpoint_to_evaluate(run_dir: Path, checkpoint: Path | None) -> Path:
    """``checkpoint``, else the run's ``best.pth``, else its ``last.pth``."""
    if checkpoint is not None:
        return checkpoint
    for name in (BEST, LAST):
        if (run_dir / name).is_file():
            return run_dir / name
    raise CenError(f"--evaluate: no checkpoint ({BEST} or {LAST}) in {run_dir}")


def evaluate(task: Task, cfg: Any, checkpoint: Path | None = None, **options: Any) -> dict:
    """Score ``checkpoint`` (default: the run's best, else last) of ``task`` on ``cfg``'s
    validation data, into the run folder ``cfg.run_dir``: settings, data and checkpoint are
    checked first; the task writes its predictions (``options``: what it offers, such as
    images) and one ``{"evaluate": ...}`` line goes to the metrics log. Returns the metrics.
    """
    path = checkpoint_to_evaluate(cfg.run_dir, checkpoint)
    refuse_foreign_checkpoint(cfg.run_dir, path, "its scores and images")
    with prepare(cfg) as ctx:
        state = load_checkpoint(path, task=task.name)
        recipe = task.build_recipe(cfg, ctx, state, str(path), False)
        folder = ctx.open_folder(cfg, resuming=True, force=False, evaluating=True)
        log.info(recipe.start_line())
        metrics = recipe.evaluate(folder.path, **options)
        epoch = state.get("epoch")
        folder.append_metrics({"evaluate": str(path), "epoch": epoch, "val": metrics})
        return metrics


def run_command(
    task: Task,
    flags: Mapping[str, Any],
    mode: RunModeOptions,
    preset: str | None = None,
    **options: Any,
) -> BestScore | dict[str, Any]:
    """What ``cen TASK train`` does with its flags: find the checkpoint in play (``--resume``,
    alone meaning the run's ``last.pth``; with ``--evaluate``, else the run's best or last),
    resolve the settings by :meth:`Task.resolve_config`, then train or evaluate (with the
    task's evaluation ``options``)."""
    defaults = task.config()
    run_dir = Path(flags.get("runs", defaults.runs)) / flags.get("exp", defaults.exp)
    checkpoint = resume_path(mode.resume, run_dir)
    if mode.evaluate:
        if mode.force:
            raise CenError("--force: not with --evaluate (it only adds to a run)")
        checkpoint = checkpoint_to_evaluate(run_dir, checkpoint)
    elif options:
        raise CenError(f"--{next(iter(options)).replace('_', '-')}: only with --evaluate")
    saved = saved_config(checkpoint, task.name)
    cfg = task.resolve_config(preset, mode.config, flags, saved, str(checkpoint))
    if mode.evaluate:
        return evaluate(task, cfg, checkpoint, **options)
    return train(task, cfg, checkpoint, mode.force)
