"""The demo: an ablation that isolates channel exchange, on the embedded synthetic data.

Four models with the ``synthetic`` preset, each scored on the validation split:

- RGB only and depth only: the same network on one modality;
- CEN without exchange: shared convolutions, private BNs and the alpha ensemble on RGB-D,
  but no exchange points and ``lamda 0`` (the modalities meet only in the ensemble);
- CEN: the same with exchange after every bottleneck's ``bn2``.

The table gives pixel acc / mean acc / mIoU of each model's final prediction (the ensemble for
the two-modality ones), the mIoU on the interaction classes (sign-a / sign-b: a sign is sign-a
when its colour is warm, which only RGB shows, *and* it is near, which only depth shows; no
late fusion of per-modality predictions finds a sign-a, see :mod:`cenfusion.data.synthetic`),
the mIoU of each modality's own head and the fraction of penalised gammas under the threshold.
Every run also gets its HTML report, with the exchange heat map per layer.

The exchange is in the paper's regime, selecting part of the channels: ``lamda`` 2.5e-3 moves
a penalised scale by about 0.5 over the run's 1000 steps, so of the narrow ResNet's ``bn2``
scales, which start spread in [0, 1), those that start low and that the task does not hold up
reach the threshold (about 60% by the end, a different share in every layer), where a larger
``lamda`` takes all of them across within a few epochs and a smaller one none.

The runs are independent, so they train side by side in child processes, each on its share
of the CPUs: the demo's network is small enough that one thread computes a step about as fast
as two, and two runs at once take half the time of two in turn. Each run logs in full to its
folder's ``log.txt``; the console gets one progress bar and one summary line per run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import multiprocessing
import os
import sys
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from queue import Empty
from typing import Any

from cenfusion.data.scenes import CLASS_NAMES, INTERACTION_CLASSES
from cenfusion.engine.run import EPOCH_RECORD, METRICS, LogRouting, log
from cenfusion.engine.threads import available_cpus
from cenfusion.errors import CenError, describe_os_error
from cenfusion.segmentation.config import SYNTHETIC, SegmentationConfig


@dataclass(frozen=True)
class DemoRun:
    name: str
    label: str
    changes: dict[str, Any]


RUNS: tuple[DemoRun, ...] = (
    DemoRun("rgb-only", "RGB only", {"modalities": ("rgb",), "exchange": False, "lamda": 0.0}),
    DemoRun(
        "depth-only", "depth only", {"modalities": ("depth",), "exchange": False, "lamda": 0.0}
    ),
    DemoRun("cen-no-exchange", "CEN without exchange", {"exchange": False, "lamda": 0.0}),
    DemoRun("cen", "CEN", {}),
)
#: Runs one process trains in turn, each with its config.
Chain = list[tuple[DemoRun, SegmentationConfig]]


@dataclass(frozen=True)
class DemoRow:
    """One model's line of the ablation table (scores x100)."""

    label: str
    pixel_acc: float
    mean_acc: float
    miou: float
    interaction_miou: float
    branch_miou: dict[str, float]
    """mIoU of each modality's own head: with exchange, a branch also labels what only the
    other modality shows."""
    exchanged: float | None
    exchanged_by_layer: dict[str, float]
    """Fraction of penalised gammas under the threshold at each exchange point."""
    seconds: float
    report: Path | None


def _interaction_miou(iou: list[float]) -> float:
    values = [iou[c] for c in INTERACTION_CLASSES if not math.isnan(iou[c])]
    return sum(values) / len(values) if values else math.nan


def _exchange_at(run_dir: Path, epoch: int) -> dict[str, Any] | None:
    """The exchange record logged for ``epoch`` (None for a model without exchange points)."""
    for line in (run_dir / METRICS).read_text().splitlines():
        record = json.loads(line)
        if record.get("epoch") == epoch and isinstance(record.get("exchange"), dict):
            return record["exchange"] if record["exchange"]["points"] else None
    return None


def _train_row(run: DemoRun, cfg: SegmentationConfig, report: bool) -> DemoRow:
    """Train one model of the ablation and read its row off the best validation."""
    from cenfusion.engine.session import train
    from cenfusion.segmentation.task import SEGMENTATION

    began = time.perf_counter()
    best = train(SEGMENTATION, cfg, force=True)
    assert best.metrics is not None  # every stage ends with a validation
    path = None
    if report:
        path = SEGMENTATION.write_report(cfg.run_dir)
    scores = best.metrics["ensemble"]
    exchange = _exchange_at(cfg.run_dir, best.epoch)
    by_layer = {}
    if exchange is not None:
        by_layer = {name: sum(v) / len(v) for name, v in exchange["points"].items()}
    return DemoRow(
        run.label,
        scores["pixel_acc"],
        scores["mean_acc"],
        scores["miou"],
        _interaction_miou(scores["iou"]),
        {m: best.metrics[m]["miou"] for m in cfg.modalities},
        None if exchange is None else exchange["overall"],
        by_layer,
        time.perf_counter() - began,
        path,
    )


class _EpochForwarder(logging.Handler):
    """Sends the epoch number of every epoch line of the run in progress to the parent."""

    def __init__(self, queue: Any) -> None:
        super().__init__()
        self.queue = queue
        self.run = ""

    def emit(self, record: logging.LogRecord) -> None:
        epoch_record = getattr(record, EPOCH_RECORD, None)
        if epoch_record is not None:
            self.queue.put((self.run, "epoch", int(epoch_record["epoch"])))


def _train_chain(chain: Chain, report: bool, queue: Any) -> None:
    """A child process: train ``chain``'s runs in turn, sending progress and rows. Its console
    lines go nowhere: each run's log.txt has them all."""
    forwarder = _EpochForwarder(queue)
    log.addHandler(forwarder)
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        for run, cfg in chain:
            forwarder.run = run.name
            queue.put((run.name, "start", None))
            try:
                queue.put((run.name, "row", _train_row(run, cfg, report)))
            except KeyboardInterrupt:
                return  # the parent was interrupted too and says so
            except CenError as err:
                queue.put((run.name, "error", str(err)))
                return
            except OSError as err:  # a full disk or an unusable folder: the user's to fix
                queue.put((run.name, "error", describe_os_error(err)))
                return
            except Exception as err:  # noqa: BLE001 - reported to the parent, traceback here
                traceback.print_exc()
                queue.put((run.name, "error", f"internal error: {type(err).__name__}: {err}"))
                return


def plan(
    runs: tuple[DemoRun, ...], configs: dict[str, SegmentationConfig], processes: int
) -> list[Chain]:
    """Split ``runs`` into ``processes`` chains of about equal cost (a step costs about as
    many units as the run has modalities), the costliest runs first."""
    chains: list[Chain] = [[] for _ in range(processes)]
    loads = [0] * processes
    for run in sorted(runs, key=lambda r: -configs[r.name].num_modalities):
        i = loads.index(min(loads))
        chains[i].append((run, configs[run.name]))
        loads[i] += configs[run.name].num_modalities
    return [chain for chain in chains if chain]


def _processes(base: SegmentationConfig, processes: int | None) -> tuple[int, int]:
    """How many runs train at once, and the CPU threads of each."""
    if processes is None:
        from cenfusion.engine.distributed import resolve_device

        on_cpu = resolve_device(base.device, base.gpu, 0).type == "cpu"
        processes = min(len(RUNS), available_cpus()) if on_cpu else 1
    if processes < 1:
        raise CenError(f"demo: processes={processes}: expected at least 1")
    return processes, base.threads or max(1, available_cpus() // processes)


def run_demo(
    base: SegmentationConfig = SYNTHETIC, report: bool = True, processes: int | None = None
) -> list[DemoRow]:
    """Train the four models of the ablation, ``processes`` at once (default: one per CPU on
    the CPU, one on a GPU); log the table and return its rows in :data:`RUNS` order."""
    if len(base.modalities) != 2 or base.num_classes != len(CLASS_NAMES):
        raise CenError("demo: needs the synthetic RGB-D data (two modalities, its classes)")
    processes, threads = _processes(base, processes)
    configs = {
        run.name: replace(base, exp=f"demo-{run.name}", threads=threads, quiet=True, **run.changes)
        for run in RUNS
    }
    for cfg in configs.values():
        cfg.validate()
    if base.runs.exists() and not base.runs.is_dir():
        raise CenError(f"--runs {base.runs}: a file, expected the folder of runs")
    if base.data is None:
        from cenfusion.data.synthetic import ensure_synthetic

        ensure_synthetic()  # once here, not raced by the children
    with LogRouting():
        log.info(
            f"cen demo: {len(RUNS)} models on the embedded RGB-D set, {processes} at a time "
            f"({threads} thread{'s' * (threads > 1)} each); full logs in {base.runs}/demo-*/log.txt"
        )
        rows = _run_parallel(plan(RUNS, configs, processes), configs, report)
        ordered = [rows[run.name] for run in RUNS]
        log.info(demo_table(ordered))
        log.info(demo_findings(ordered))
        for row in ordered:
            if row.report is not None:
                log.info(f"report of {row.label}: {row.report}")
    return ordered


def _run_parallel(
    chains: list[Chain], configs: dict[str, SegmentationConfig], report: bool
) -> dict[str, DemoRow]:
    from tqdm import tqdm

    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    children = [context.Process(target=_train_chain, args=(c, report, queue)) for c in chains]
    labels = {run.name: run.label for run in RUNS}
    show = sys.stderr.isatty()
    bars = {
        name: tqdm(
            total=sum(cfg.epochs),
            desc=f"{labels[name]:<21}",
            unit="epoch",
            position=i,
            leave=False,
            disable=not show,
            dynamic_ncols=True,
        )
        for i, (name, cfg) in enumerate(configs.items())
    }
    rows: dict[str, DemoRow] = {}
    try:
        for child in children:
            child.start()
        while len(rows) < len(configs):
            try:
                name, kind, value = queue.get(timeout=1.0)
            except Empty:
                dead = [c for c in children if c.exitcode not in (None, 0)]
                if dead:
                    raise CenError(
                        f"demo: a training process ended without its result "
                        f"(exit code {dead[0].exitcode})"
                    ) from None
                continue
            if kind == "start":
                bars[name].reset()  # its clock starts with the run, not with the demo
            elif kind == "epoch":
                bars[name].update(value - bars[name].n)
            elif kind == "row":
                rows[name] = value
                bars[name].close()
                tqdm.write(summary_line(value), file=sys.stdout)
            else:
                raise CenError(f"demo {name}: {value}")
    finally:
        for bar in bars.values():
            bar.close()
        for child in children:
            if child.is_alive() and len(rows) < len(configs):
                child.terminate()
            child.join()
        queue.close()
    return rows


def summary_line(row: DemoRow) -> str:
    """One line for a finished run."""
    branches = ", ".join(f"{m} {v:.2f}" for m, v in row.branch_miou.items())
    line = f"{row.label}: mIoU {row.miou:.2f}, signs {row.interaction_miou:.2f}; heads {branches}"
    if row.exchanged is not None:
        layers = row.exchanged_by_layer.values()
        line += (
            f"; {100 * row.exchanged:.0f}% exchanged "
            f"({100 * min(layers):.0f}-{100 * max(layers):.0f}% by exchange point)"
        )
    return line + f" ({row.seconds:.0f} s)"


def demo_table(rows: list[DemoRow]) -> str:
    """Markdown table of the ablation."""
    names = list(dict.fromkeys(m for r in rows for m in r.branch_miou))
    header = "| model | pixel acc | mean acc | mIoU | mIoU sign-a/b | heads' mIoU "
    lines = [f"{header}{' / '.join(names)} | exchanged |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        exchanged = "-" if r.exchanged is None else f"{100 * r.exchanged:.0f}%"
        branches = " / ".join(
            f"{r.branch_miou[m]:.2f}" if m in r.branch_miou else "-" for m in names
        )
        lines.append(
            f"| {r.label} | {r.pixel_acc:.2f} | {r.mean_acc:.2f} | {r.miou:.2f} | "
            f"{r.interaction_miou:.2f} | {branches} | {exchanged} |"
        )
    return "\n".join(lines)


def demo_findings(rows: list[DemoRow]) -> str:
    """Two sentences on what the table shows, worded from its numbers."""
    by_label = {r.label: r for r in rows}
    cen, late = by_label["CEN"], by_label["CEN without exchange"]
    single = max((by_label["RGB only"], by_label["depth only"]), key=lambda r: r.miou)

    def compare(a: DemoRow, b: DemoRow) -> str:
        gap = a.miou - b.miou
        return f"{abs(gap):.2f} mIoU points {'above' if gap > 0 else 'below'} {b.label}"

    why = ": its ensemble labels what either modality alone cannot see" * (late.miou > single.miou)
    return (
        f"CEN without exchange is {compare(late, single)}, the better single modality{why}. "
        f"CEN is {compare(cen, late)}, {cen.interaction_miou - late.interaction_miou:+.2f} on "
        f"sign-a/sign-b, the pair that only features exchanged inside the network can label "
        f"(a warm and near sign; each modality sees one of the two)."
    )
