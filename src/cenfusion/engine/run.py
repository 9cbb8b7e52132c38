"""What every run shares: its settings, its folder, its log, its metrics and its random state.

A run folder ``RUNS/EXP`` holds ``config.yaml``, ``log.txt``, ``metrics.jsonl`` (one JSON line
per epoch, marked with its ``epoch``), ``last.pth`` and ``best.pth`` and, optionally,
TensorBoard scalars under ``tb/``. It is only touched by a run whose settings, data and
checkpoint were checked first (:meth:`RunFolder.open` comes last in a task's set-up); an
existing run is continued only with ``--resume`` and replaced only with ``--force``, which
moves the old folder aside.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, final

from cenfusion.engine.config import (
    check_finite,
    config_from_dict,
    config_to_dict,
    dump_yaml,
    load_yaml,
    replace_config,
    setting,
)
from cenfusion.engine.files import FolderLock, atomic_write
from cenfusion.errors import CenError

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11

log = logging.getLogger("cenfusion")

LAST, BEST, METRICS, CONFIG = "last.pth", "best.pth", "metrics.jsonl", "config.yaml"
CONFUSION = "confusion.npz"
#: The files of a run written atomically (see :func:`~cenfusion.engine.files.atomic_write`).
ATOMIC_FILES = (LAST, BEST, METRICS, CONFIG, CONFUSION)
#: The log record of each epoch's line carries that epoch's metrics record under this
#: attribute, so a handler can follow a run without parsing its text.
EPOCH_RECORD = "epoch_record"


#: Far beyond any machine's use, short of what the system cannot start (a million threads
#: or loader processes end in an out-of-memory error, not a run).
MAX_THREADS, MAX_WORKERS = 1024, 256


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how a command runs its model: device, GPUs, precision, memory layout,
    compile, CPU threads and memory. Every command that runs a model takes these settings
    (a run's config extends them) and opens them with
    :func:`~cenfusion.engine.runtime.open_runtime`."""

    device: str = setting("auto", "where to run", choices=("auto", "cpu", "cuda"))
    gpu: tuple[int, ...] = setting((), "CUDA device index(es); under torchrun the local rank")
    amp: bool = setting(
        False, "mixed precision: bfloat16 on the CPU, float16 on CUDA (training scales its loss)"
    )
    amp_dtype: str = setting(
        "auto",
        "with --amp: bfloat16 (no loss scaling), float16 (with a GradScaler; CUDA only), or "
        "auto: bfloat16 on the CPU, float16 on CUDA",
        choices=("auto", "bfloat16", "float16"),
    )
    threads: int | None = setting(None, "CPU threads of this process (none: the CPUs it may use)")
    channels_last: bool = setting(False, "channels-last memory format for the convolutions")
    keep_memory: bool = setting(
        True,
        "CPU: keep freed memory in the process for the next tensors (no page faults; resident "
        "memory stays at its peak)",
    )
    compile: bool = setting(False, "torch.compile the network (eager, with a warning, if it fails)")
    compile_mode: str = setting(
        "default",
        "with --compile: reduce-overhead also captures CUDA graphs of fixed shapes; "
        "max-autotune also searches kernels",
        choices=("default", "reduce-overhead", "max-autotune"),
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "gpu", tuple(self.gpu))

    def validate(self) -> None:
        """Raise :class:`CenError` (one line) for settings that cannot run."""
        if self.threads is not None and not 1 <= self.threads <= MAX_THREADS:
            raise CenError(f"--threads {self.threads}: expected 1 to {MAX_THREADS}")
        if any(g < 0 for g in self.gpu):
            raise CenError(f"--gpu {' '.join(map(str, self.gpu))}: expected indices >= 0")


@dataclass(frozen=True)
class RunConfig(RuntimeConfig):
    """Settings every task shares; a task's config extends it (and may change defaults)."""

    exp: str = setting("cen", "experiment name: the run folder RUNS/EXP", aliases=("-c", "--ckpt"))
    runs: Path = setting(Path("runs"), "folder of run folders")
    data: Path | None = setting(None, "data root (none: the embedded synthetic set)")
    batch_size: int = setting(1, "samples per step and process")
    val_every: int = setting(
        5, "validate every N epochs (of a stage) and at the end", aliases=("--eval-every",)
    )
    workers: int = setting(4, "data-loading processes")
    seed: int = setting(0, "random seed", aliases=("--random-seed",))
    quiet: bool = setting(False, "no progress bar")
    plots: bool = setting(True, "write plots to RUNS/EXP/plots/ at every validation")
    tensorboard: bool = setting(False, "also write TensorBoard scalars to RUNS/EXP/tb/")

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "runs", Path(self.runs))
        if self.data is not None:
            object.__setattr__(self, "data", Path(self.data))

    @property
    def run_dir(self) -> Path:
        return Path(self.runs) / self.exp

    def to_dict(self) -> dict[str, Any]:
        """Every setting as a YAML value (paths as strings, tuples as lists)."""
        return config_to_dict(self)

    def to_yaml(self) -> str:
        """The text of a run's ``config.yaml``."""
        return dump_yaml(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "config") -> Self:
        """Build from a mapping of settings (the rest keep the class's defaults); an unknown
        key or a wrong type raises :class:`CenError` naming ``where`` and the key."""
        return config_from_dict(cls, values, where)

    @classmethod
    def from_yaml(cls, path: str | Path) -> Self:
        """Read a run's ``config.yaml``, or any YAML file of a subset of the settings."""
        return cls.from_dict(load_yaml(path), str(path))

    def replace(self, **changes: Any) -> Self:
        """A copy with ``changes`` applied, checked like a YAML file."""
        return replace_config(self, changes)

    def validate(self) -> None:
        """Raise :class:`CenError` (one line) for shared settings that cannot run, and for a
        number that is not finite in any setting of the task's config."""
        super().validate()
        check_finite(self)
        if self.exp in ("", ".", "..") or any(sep in self.exp for sep in ("/", "\\")):
            raise CenError(
                f"--exp {self.exp!r}: expected a run name, one folder name inside --runs "
                "(not empty, no '/', not '.' or '..')"
            )
        if not 0 <= self.seed < 2**32:
            raise CenError(f"--seed {self.seed}: expected 0 to {2**32 - 1}")
        for name in ("batch_size", "val_every"):
            if getattr(self, name) < 1:
                raise CenError(f"--{name.replace('_', '-')} {getattr(self, name)}: expected >= 1")
        if not 0 <= self.workers <= MAX_WORKERS:
            raise CenError(f"--workers {self.workers}: expected 0 to {MAX_WORKERS}")
        if self.tensorboard and importlib.util.find_spec("tensorboard") is None:
            raise CenError(
                "--tensorboard: the tensorboard package is not installed (pip install tensorboard)"
            )


@dataclass(frozen=True)
class RunModeOptions:
    """How a training command treats its run folder: the flags every task's ``train`` has."""

    resume: Path | None = setting(
        None,
        "continue a run: a checkpoint, or alone the run's own RUNS/EXP/last.pth",
        bare=Path(LAST),
        metavar="PATH",
    )
    force: bool = setting(
        False, "start afresh in a folder that holds a run (the old one is moved aside)"
    )
    config: Path | None = setting(None, "YAML file of settings (flags win)")
    evaluate: bool = setting(
        False, "evaluate --resume PATH, else the run's best.pth, else last.pth"
    )


def resume_path(resume: Path | None, run_dir: Path) -> Path | None:
    """``--resume`` alone means the run's own ``last.pth``, which must exist.

    Raises:
        CenError: ``--resume`` alone, and ``run_dir`` holds no checkpoint.
    """
    if resume is None:
        return None
    if resume != Path(LAST):
        return resume
    if not (run_dir / LAST).is_file():
        if (run_dir / BEST).is_file():
            raise CenError(
                f"--resume: {run_dir} holds no {LAST}, only {BEST}; --resume {run_dir / BEST} "
                "continues from it"
            )
        FolderLock.refuse_if_held(run_dir)  # a run still before its first checkpoint
        stopped = " (its run stopped before the first checkpoint)" if run_dir.is_dir() else ""
        raise CenError(
            f"--resume: nothing to resume, {run_dir} holds no {LAST}{stopped}; "
            "start the run without --resume"
        )
    return run_dir / LAST


def refuse_foreign_checkpoint(path: Path, checkpoint: Path, doing: str) -> None:
    """Refuse ``checkpoint`` from outside the run folder ``path`` when ``path`` holds a run
    of its own (a checkpoint): continuing or scoring another run's model there would write
    over that run's checkpoints or mix its results with another model's."""
    own = any((path / name).is_file() for name in (LAST, BEST))
    if own and checkpoint.resolve().parent != path.resolve():
        raise CenError(
            f"--resume {checkpoint}: another run's checkpoint, and {path} holds a run of its "
            f"own, which {doing} would mix into; choose another -c EXP"
        )


def holds_run(path: Path) -> bool:
    """Whether ``path`` holds work to keep: a checkpoint, or a metrics line (an evaluation's
    scores). A folder whose run stopped before its first checkpoint holds none."""
    if any((path / name).is_file() for name in (LAST, BEST)):
        return True
    metrics = path / METRICS
    if not metrics.is_file():
        return False
    for line in metrics.read_text(errors="replace").splitlines():
        try:
            json.loads(line)
        except ValueError:
            continue
        return True
    return False


class RunFolder:
    """The folder of one run; writes only through here, only on the main process."""

    def __init__(self, path: Path, is_main: bool = True) -> None:
        self.path = path
        self.is_main = is_main

    @classmethod
    def open(cls, path: Path, resuming: bool, force: bool, is_main: bool = True) -> RunFolder:
        """Claim ``path`` for a run: new, continued (``resuming``) or replaced (``force``).

        Raises :class:`CenError` when ``path`` holds a run (:func:`holds_run`) and neither is
        given. A folder left by a run that stopped before its first checkpoint is taken over
        (its config and empty metrics go; its log is appended to). Left-over temporaries of
        an interrupted write (``.last.pth.*``, ...) are removed.
        """
        kept = cls.check_claim(path, resuming, force)
        if is_main:
            if kept and force and not resuming:
                stamp = time.strftime("%Y%m%d-%H%M%S")
                aside = _unused(path.with_name(f"{path.name}.old-{stamp}"))
                path.rename(aside)
                log.info(f"moved the previous run to {aside}")
            elif not kept and not resuming and (path / CONFIG).exists():
                for name in (CONFIG, METRICS):
                    (path / name).unlink(missing_ok=True)
                log.info(f"{path} holds no checkpoint (its run stopped before the first): reused")
            path.mkdir(parents=True, exist_ok=True)
            for name in ATOMIC_FILES:
                for tmp in path.glob(f".{name}.*"):
                    tmp.unlink(missing_ok=True)
        return cls(path, is_main)

    @staticmethod
    def check_claim(path: Path, resuming: bool, force: bool) -> bool:
        """Whether ``path`` holds a run, after refusing one that neither ``resuming`` nor
        ``force`` may take; writes nothing, so a run checks it before its slow set-up."""
        kept = holds_run(path)
        if kept and not resuming and not force:
            raise CenError(
                f"{path} already holds a run; --resume continues it, --force moves it aside "
                "and starts afresh, or choose another -c EXP"
            )
        return kept

    def save_config(self, config: Any, write: bool = True) -> None:
        """Log the full resolved config and (``write``) write it as ``config.yaml``."""
        text = dump_yaml(config)
        log.info(f"config ({type(config).__name__}):\n" + text.rstrip())
        if self.is_main and write:
            atomic_write(self.path / CONFIG, lambda f: f.write(text.encode()))

    def append_metrics(self, record: dict[str, Any]) -> None:
        if self.is_main:
            append_metrics(self.path / METRICS, record)

    def truncate_metrics(self, epoch: int) -> None:
        """Drop epoch lines after ``epoch`` (written before a checkpoint that never came) and
        a line cut short by a kill; the file is replaced atomically."""
        path = self.path / METRICS
        if not self.is_main or not path.is_file():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("epoch", 0) <= epoch:
                kept.append(line + "\n")
        atomic_write(path, lambda f: f.write("".join(kept).encode()))


def _unused(path: Path) -> Path:
    """``path``, or ``path-2``, ``path-3``, ... the first that does not exist."""
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


def append_metrics(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line to a metrics log, flushed to disk before returning."""
    with path.open("a") as f:
        f.write(json.dumps(record, allow_nan=True) + "\n")
        f.flush()


class _RunLogFile(logging.FileHandler):
    """A run's ``log.txt``. When the system refuses a line (a full disk), it stops writing
    instead of printing a traceback for every line; the run's next checkpoint or metrics
    write meets the same cause and ends the run with it in one line."""

    failed = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.failed:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        self.failed = True


def _silent(record: logging.LogRecord) -> bool:
    return False


@final
class LogRouting:
    """Route :data:`log` to the console (once, however deeply nested) and, from
    :meth:`add_file` on, to a run's ``log.txt`` (appended); undone on exit. Off the main
    process (``is_main=False``, the other ranks of a DDP run) the console says nothing, so
    that each line appears once."""

    def __init__(self, is_main: bool = True) -> None:
        self.handlers: list[logging.Handler] = []
        consoles = [h for h in log.handlers if getattr(h, "console", False)]
        self.muted = [] if is_main else consoles
        if is_main and not consoles:
            handler = logging.StreamHandler(sys.stdout)
            handler.console = True  # type: ignore[attr-defined]
            self.handlers.append(handler)

    def __enter__(self) -> LogRouting:
        for handler in self.handlers:
            handler.setFormatter(logging.Formatter("%(message)s"))
            log.addHandler(handler)
        for handler in self.muted:
            handler.addFilter(_silent)
        log.setLevel(logging.INFO)
        log.propagate = False
        return self

    def add_file(self, run_dir: Path) -> None:
        handler = _RunLogFile(run_dir / "log.txt")
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        self.handlers.append(handler)

    def __exit__(self, *exc: object) -> None:
        for handler in self.muted:
            handler.removeFilter(_silent)
        for handler in self.handlers:
            log.removeHandler(handler)
            handler.close()
