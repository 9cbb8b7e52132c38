"""The training run both tasks use, and the contract a task fills in (:class:`Recipe`).

A task (:class:`~cenfusion.engine.task.Task`) supplies a function that builds its recipe (data,
models, optimisers, checks), one training step, one validation, its checkpoint state and its
log lines. The engine owns the rest: the run sequences (:mod:`cenfusion.engine.session`:
settings, process set-up, checkpoint, run folder), the epoch loop with its progress bar,
epoch seeding, mixed precision and its scaler, the non-finite-loss stop, the best-score
tracker, the one checkpoint schema, resume, the metrics log and TensorBoard; reports hang
on a hook it calls after each validation.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler
from torch.utils.data.distributed import DistributedSampler

from cenfusion.engine.background import BackgroundCalls
from cenfusion.engine.checkpoint import save_checkpoint
from cenfusion.engine.config import config_to_dict
from cenfusion.engine.distributed import on_main
from cenfusion.engine.files import FolderLock
from cenfusion.engine.interrupts import DeferredForkLoader, catching_interrupts
from cenfusion.engine.rng import capture_rng, restore_rng, seed_everything
from cenfusion.engine.run import (
    BEST,
    CONFIG,
    EPOCH_RECORD,
    LAST,
    LogRouting,
    RunFolder,
    log,
)
from cenfusion.engine.runtime import Runtime, open_runtime
from cenfusion.engine.threads import worker_init
from cenfusion.errors import CenError


@dataclass
class Context(Runtime):
    """Where a run executes (its :class:`~cenfusion.engine.runtime.Runtime`), its log, and
    what it holds until it ends (the lock of its run folder)."""

    run_log: LogRouting
    held: contextlib.ExitStack

    def loader(self, dataset: Dataset, cfg: Any, **kwargs: Any) -> DataLoader:
        """A DataLoader with the run's workers (one thread each); pinned memory on CUDA.

        Workers start afresh every epoch, seeded from the loader's generator (or torch's
        global one) at that epoch's start, so their random state depends only on the seed
        and the epoch: a resumed run repeats the uninterrupted one bit for bit. Persistent
        workers would carry their state across epochs, which a resumed run cannot rebuild.
        """
        workers = cfg.workers
        options: dict[str, Any] = {"batch_size": cfg.batch_size, "num_workers": workers}
        options.update(pin_memory=self.device.type == "cuda", persistent_workers=False)
        if workers > 0:
            options["worker_init_fn"] = worker_init
        return DeferredForkLoader(dataset, **{**options, **kwargs})

    def train_loader(self, dataset: Dataset, cfg: Any, drop_last: bool) -> DataLoader:
        """The training loader: shuffled by its own generator, or split across the processes
        by a DistributedSampler; :func:`fit` seeds both at every epoch (:func:`seed_epoch`)."""
        generator = torch.Generator()
        sampler = (
            DistributedSampler(dataset, shuffle=True, seed=cfg.seed, drop_last=drop_last)
            if self.dist.enabled
            else RandomSampler(dataset, generator=generator)
        )
        return self.loader(dataset, cfg, sampler=sampler, drop_last=drop_last, generator=generator)

    def open_folder(
        self, cfg: Any, resuming: bool, force: bool, evaluating: bool = False
    ) -> RunFolder:
        """Claim the run folder (after every check passed), log to it, save the config; an
        evaluation logs its settings but keeps the ``config.yaml`` of a run it adds to.

        The main process decides and writes; the others learn its verdict (or its error).
        """

        def claim() -> Path:
            self.hold_lock(cfg.run_dir)
            folder = RunFolder.open(cfg.run_dir, resuming, force)
            self.run_log.add_file(folder.path)
            kept = evaluating and (folder.path / CONFIG).is_file()
            folder.save_config(cfg, write=not kept)
            return folder.path

        return RunFolder(on_main(claim), self.dist.is_main)

    def hold_lock(self, folder: Path) -> FolderLock:
        """Lock ``folder`` until the run ends (see :class:`FolderLock`)."""
        lock = FolderLock(folder)
        self.held.callback(lock.release)
        return lock


@contextlib.contextmanager
def prepare(cfg: Any) -> Iterator[Context]:
    """Validate ``cfg``, open its runtime (joining the process group of a torchrun launch),
    seed, start logging; Ctrl-C stops the run even while loader workers start
    (:mod:`~cenfusion.engine.interrupts`)."""
    cfg.validate()
    with catching_interrupts(), open_runtime(cfg, distributed=True) as runtime:
        seed_everything(cfg.seed + runtime.dist.rank)
        with LogRouting(runtime.dist.is_main) as run_log, contextlib.ExitStack() as held:
            yield Context(**vars(runtime), run_log=run_log, held=held)


@dataclass
class BestScore:
    """The best validation so far; ``higher`` says which way is better."""

    higher: bool
    score: float | None = None
    epoch: int = 0
    metrics: dict[str, Any] | None = None

    def update(self, score: float, epoch: int, metrics: dict[str, Any]) -> bool:
        """Record ``score`` if it beats the best; returns whether it did."""
        better = self.score is None or (score > self.score if self.higher else score < self.score)
        if better:
            self.score, self.epoch, self.metrics = score, epoch, metrics
        return better


def seed_epoch(loader: DataLoader, seed: int, epoch: int) -> None:
    """Seed epoch ``epoch`` (1-based) of ``loader``: its order and its workers' random state
    depend only on the seed and the epoch, so a resumed run draws what the uninterrupted one
    drew. (Randomness outside the loader, such as dropout, is saved in every checkpoint.)"""
    if loader.generator is not None:
        loader.generator.manual_seed(seed * 1_000_003 + epoch - 1)
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch - 1)


class Recipe(ABC):
    """A task's part of a training run. Built with its models, optimisers and loaders ready.

    ``train_loader`` is seeded by the engine at every epoch; the mixed-precision scaler of
    ``ctx`` is saved and restored by the engine with the recipe's own state.
    """

    task: str
    ctx: Context
    train_loader: DataLoader
    #: Whether a higher validation score is better (mIoU) or a lower one (FID, L1).
    higher_is_better: bool = True
    #: What the data trained on was like, kept with each checkpoint for the readers of its
    #: model (a segmenter's: each depth modality's bit depth).
    data_facts: dict[str, Any] | None = None

    def start_line(self) -> str:
        """The log line that opens a run: what is trained on what, where."""
        return f"{self.task}: {self.num_epochs()} epochs"

    def best_line(self, best: BestScore) -> str | None:
        """The log line that closes a run with its best validation, if there was one."""
        return None

    def keeps_best(self, state: dict[str, Any]) -> bool:
        """Whether the best score saved in ``state`` still counts (the same criterion)."""
        return True

    @abstractmethod
    def num_epochs(self) -> int:
        """Epochs of the whole schedule (every stage)."""

    @abstractmethod
    def begin_epoch(self, epoch: int) -> Iterable[dict[str, Any]]:
        """Prepare epoch ``epoch`` (1-based; stages, samplers) and return its batches."""

    @abstractmethod
    def train_step(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """One optimisation step; returns detached scalar losses, the total under ``loss``."""

    def batch_size(self, batch: dict[str, Any]) -> int:
        return len(batch["name"])

    def epoch_record(self) -> dict[str, Any]:
        """Extra fields of the epoch's metrics line (e.g. the exchange fraction)."""
        return {}

    @abstractmethod
    def wants_validation(self, epoch: int) -> bool: ...

    @abstractmethod
    def validate(self, epoch: int) -> tuple[dict[str, Any], float]:
        """Validation metrics and the score that decides the best checkpoint."""

    def on_best(self, epoch: int) -> None:
        """Called when epoch ``epoch`` became the best (before ``best.pth`` is written)."""

    @abstractmethod
    def evaluate(self, run_dir: Path, **options: Any) -> dict[str, Any]:
        """A checkpoint's evaluation (:func:`~cenfusion.engine.session.evaluate`): its
        validation metrics, logged; what the task writes of it (``options``) goes under
        ``run_dir``."""

    @abstractmethod
    def describe(self, record: dict[str, Any]) -> str:
        """One log line for an epoch's metrics record."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Model record (``task``, ``model_config``, ``model``) plus what resume needs."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any], where: str) -> None: ...


def _run_epoch(recipe: Recipe, epoch: int, config: Any) -> dict[str, float]:
    """Train one epoch with a progress bar; returns mean losses, seconds, data seconds and
    the seconds of its first step (compilation, cuDNN's choices and warm-up show there).

    A step's losses are read (a wait for the device) once the next step is queued, so that
    the device never idles while the host fetches and queues a batch; the first step is read
    at once, to time it. A non-finite loss still stops the run naming its iteration. Under
    DDP the mean losses are over every process's steps."""
    from tqdm import tqdm

    seed_epoch(recipe.train_loader, config.seed, epoch)
    batches = recipe.begin_epoch(epoch)
    total = recipe.num_epochs()
    sums: dict[str, float] = {}
    steps, samples, data_time, first_step = 0, 0, 0.0, 0.0
    began = time.perf_counter()
    bar = tqdm(
        batches,
        desc=f"epoch {epoch}/{total}",
        leave=False,
        disable=getattr(config, "quiet", False) or not sys.stderr.isatty(),
        dynamic_ncols=True,
    )

    def read(losses: dict[str, Tensor], iteration: int) -> None:
        values = {k: float(v) for k, v in losses.items()}
        if not all(math.isfinite(v) for v in values.values()):
            bad = ", ".join(f"{k} {v}" for k, v in values.items() if not math.isfinite(v))
            raise CenError(f"epoch {epoch}, iteration {iteration}: {bad}; stopping")
        for key, value in values.items():
            sums[key] = sums.get(key, 0.0) + value
        elapsed = time.perf_counter() - began
        bar.set_postfix(loss=f"{values['loss']:.4f}", img_s=f"{samples / elapsed:.1f}")

    unread: tuple[dict[str, Tensor], int] | None = None
    waited = time.perf_counter()
    for batch in bar:
        data_time += time.perf_counter() - waited
        stepped = time.perf_counter()
        losses = recipe.train_step(batch)
        steps += 1
        samples += recipe.batch_size(batch)
        if steps == 1:
            read(losses, steps)
            first_step = time.perf_counter() - stepped
        else:
            if unread is not None:
                read(*unread)
            unread = (losses, steps)
        waited = time.perf_counter()
    if unread is not None:
        read(*unread)
    seconds = time.perf_counter() - began
    counted = steps
    if recipe.ctx.dist.enabled:
        sums, counted = _summed_over_processes(sums, steps, recipe.ctx.device)
    means = {key: value / max(counted, 1) for key, value in sums.items()}
    times = {"seconds": seconds, "data_seconds": data_time, "first_step_seconds": first_step}
    return {**means, **{key: round(value, 3) for key, value in times.items()}}


def _summed_over_processes(
    sums: dict[str, float], steps: int, device: torch.device
) -> tuple[dict[str, float], int]:
    """Every process's loss sums and step count added up (one collective an epoch), so that
    an epoch's losses are those of the whole batch, as one process would log them."""
    import torch.distributed as dist

    keys = sorted(sums)
    totals = torch.tensor([sums[k] for k in keys] + [steps], dtype=torch.float64, device=device)
    dist.all_reduce(totals)
    *summed, counted = totals.tolist()
    return dict(zip(keys, summed)), int(counted)


class Scalars:
    """TensorBoard scalars of every numeric field of the metrics lines (optional dependency)."""

    def __init__(self, folder: RunFolder, enabled: bool) -> None:
        self.writer = None
        if not enabled or not folder.is_main:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(folder.path / "tb"))

    def add(self, record: dict[str, Any], epoch: int, prefix: str = "") -> None:
        if self.writer is None:
            return
        for key, value in record.items():
            name = f"{prefix}{key}"
            if key == "gamma_hist":
                continue
            if isinstance(value, dict):
                self.add(value, epoch, f"{name}/")
            elif isinstance(value, list) and all(isinstance(v, (int, float)) for v in value):
                for i, v in enumerate(value):
                    self.writer.add_scalar(f"{name}/{i}", v, epoch)
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(name, value, epoch)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _random_streams_kept(device: torch.device) -> contextlib.AbstractContextManager:
    """Validation draws from the random streams (a loader's seed, a generator's dropout):
    forked, so that training goes on as if it had not run, whichever epochs validate."""
    cuda = [device.index or 0] if device.type == "cuda" else []
    return torch.random.fork_rng(cuda)


def _checkpoint(recipe: Recipe, config: Any, epoch: int, best: BestScore) -> dict[str, Any]:
    return {
        **recipe.state_dict(),
        "scaler": recipe.ctx.precision.scaler.state_dict(),
        "task": recipe.task,
        "config": config_to_dict(config),
        "epoch": epoch,
        "best": asdict(best),
        "rng": capture_rng(),
        **({"data": recipe.data_facts} if recipe.data_facts else {}),
    }


def _interrupted_line(done: int, start: int, total: int, where: str, here: bool) -> str:
    """What a run stopped by Ctrl-C leaves: the epoch it stopped in, what resumes it.
    ``here``: the checkpoint it resumed (``where``) is this run folder's own."""
    when = f"in epoch {done + 1} of {total}" if done < total else "after its last epoch"
    if done > start or (start and here):
        return f"interrupted {when}; {LAST} holds epoch {done}, --resume continues"
    if start:
        return f"interrupted {when}; nothing saved here since {where} (epoch {start})"
    return f"interrupted {when}; no checkpoint yet"


def fit(
    recipe: Recipe,
    config: Any,
    folder: RunFolder,
    resume: dict[str, Any] | None = None,
    where: str = "checkpoint",
    after_validation: Callable[[Path], None] | None = None,
) -> BestScore:
    """Train ``recipe`` to the end of its schedule, continuing ``resume`` when given.

    Each epoch's metrics line is written before its checkpoint, so a kill at any moment loses
    nothing a checkpoint holds; on resume, lines after the checkpoint's epoch are dropped.
    ``after_validation(run_folder)`` runs for the main process once a validation's line is
    written, in a child interpreter beside training (:class:`BackgroundCalls`), and once more
    at the end if validations came faster than it: the task's reports (plots) hang there, so
    the engine knows nothing of them. The run ends when its last call has; a run that stops
    early (an error, Ctrl-C) stops the call.
    """
    best = BestScore(recipe.higher_is_better)
    start = 0
    if resume is not None:
        recipe.load_state_dict(resume, where)
        if "scaler" in resume:
            recipe.ctx.precision.scaler.load_state_dict(resume["scaler"])
        start = int(resume.get("epoch", 0))
        saved = resume.get("best") or {}
        same = saved.get("higher", recipe.higher_is_better) == recipe.higher_is_better
        if same and recipe.keeps_best(resume):
            best = BestScore(**{**saved, "higher": recipe.higher_is_better})
        if "rng" in resume:
            restore_rng(resume["rng"], recipe.ctx.dist.rank)
        folder.truncate_metrics(start)
        log.info(f"resumed {where} after epoch {start}")
        if start == recipe.num_epochs():
            log.info(f"nothing to train: {where} is at epoch {start}, where the schedule ends")
    scalars = Scalars(folder, getattr(config, "tensorboard", False))
    reports = None
    if after_validation is not None and folder.is_main:
        reports = BackgroundCalls(after_validation, "drawing the run's reports")
    total = recipe.num_epochs()
    done = start
    try:
        for epoch in range(start + 1, total + 1):
            record: dict[str, Any] = {"epoch": epoch}
            record.update(_run_epoch(recipe, epoch, config))
            if epoch == start + 1:
                log.info(f"first step {record['first_step_seconds']:.2f} s (warm-up included)")
            record.update(recipe.epoch_record())
            improved = False
            if recipe.wants_validation(epoch):
                with _random_streams_kept(recipe.ctx.device):
                    metrics, score = recipe.validate(epoch)
                improved = best.update(score, epoch, metrics)
                record.update(val=metrics, best=improved)
            folder.append_metrics(record)
            scalars.add(record, epoch)
            if "val" in record and reports is not None:
                reports.request(folder.path)
            state = _checkpoint(recipe, config, epoch, best)
            if improved:
                recipe.on_best(epoch)
                if folder.is_main:
                    save_checkpoint(folder.path / BEST, state)
            if folder.is_main:
                save_checkpoint(folder.path / LAST, state)
            done = epoch
            log.info(recipe.describe(record), extra={EPOCH_RECORD: record})
        if reports is not None:
            reports.finish()
    except KeyboardInterrupt:
        here = Path(where).resolve().parent == folder.path.resolve()
        log.info(_interrupted_line(done, start, total, where, here))
        raise
    finally:
        scalars.close()
        if reports is not None:
            reports.stop()
    return best
