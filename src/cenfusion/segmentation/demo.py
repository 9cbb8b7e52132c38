"""The demo: an ablation that isolates channel exchange, on the embedded synthetic data.

Four models with the ``synthetic`` preset, each scored on the validation split:

- RGB only and depth only: the same network on one modality;
- CEN without exchange: shared convolutions, private BNs and the alpha ensemble on RGB-D,
  but no exchange points and ``lamda 0`` (the modalities meet only in the ensemble);
- CEN: the same with exchange after every bottleneck's ``bn2``.

The table gives pixel acc / mean acc / mIoU of each model's final prediction (the ensemble for
the two-modality ones), the mIoU on the interaction classes (sign-a / sign-b, whose label is the
XOR of a colour seen only in RGB and a distance seen only in depth: see
:mod:`cenfusion.data.synthetic`), the mIoU of each modality's own head (exchange lets the
depth branch label classes only RGB shows) and the fraction of penalised gammas under the
threshold.
Every run also gets its HTML report.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cenfusion.data.synthetic import CLASS_NAMES, INTERACTION_CLASSES
from cenfusion.engine.run import METRICS, LogRouting, log
from cenfusion.errors import CenError
from cenfusion.segmentation.config import SYNTHETIC, SegmentationConfig
from cenfusion.segmentation.train import train


@dataclass(frozen=True)
class DemoRun:
    name: str
    label: str
    changes: dict[str, Any]


RUNS: tuple[DemoRun, ...] = (
    DemoRun("rgb-only", "RGB only", {"modalities": ("rgb",)}),
    DemoRun("depth-only", "depth only", {"modalities": ("depth",)}),
    DemoRun("cen-no-exchange", "CEN without exchange", {"exchange": False, "lamda": 0.0}),
    DemoRun("cen", "CEN", {}),
)


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
    report: Path | None


def _interaction_miou(iou: list[float]) -> float:
    values = [iou[c] for c in INTERACTION_CLASSES if not math.isnan(iou[c])]
    return sum(values) / len(values) if values else math.nan


def _exchanged_at_best(run_dir: Path, epoch: int) -> float | None:
    """The exchange fraction logged for ``epoch`` (None for a single-modality model)."""
    for line in (run_dir / METRICS).read_text().splitlines():
        record = json.loads(line)
        if record.get("epoch") == epoch and isinstance(record.get("exchange"), dict):
            return record["exchange"]["overall"] if record["exchange"]["points"] else None
    return None


def run_demo(base: SegmentationConfig = SYNTHETIC, report: bool = True) -> list[DemoRow]:
    """Train the four models of the ablation; log and return the table's rows."""
    if len(base.modalities) != 2 or base.num_classes != len(CLASS_NAMES):
        raise CenError("demo: needs the synthetic RGB-D data (two modalities, its classes)")
    rows: list[DemoRow] = []
    with LogRouting():
        for run in RUNS:
            cfg = replace(base, exp=f"demo-{run.name}", **run.changes)
            log.info(f"=== {run.label}: {' + '.join(cfg.modalities)} ===")
            best = train(cfg, force=True)
            if best.metrics is None:
                raise CenError(f"demo {run.name}: no epoch was trained (--epochs {cfg.epochs})")
            scores = best.metrics["ensemble"]
            path = None
            if report:
                from cenfusion.reporting.html import write_report

                path = write_report(cfg.run_dir)
            rows.append(
                DemoRow(
                    run.label,
                    scores["pixel_acc"],
                    scores["mean_acc"],
                    scores["miou"],
                    _interaction_miou(scores["iou"]),
                    {m: best.metrics[m]["miou"] for m in cfg.modalities},
                    _exchanged_at_best(cfg.run_dir, best.epoch),
                    path,
                )
            )
        log.info(demo_table(rows))
        for row in rows:
            if row.report is not None:
                log.info(f"report of {row.label}: {row.report}")
    return rows


def demo_table(rows: list[DemoRow]) -> str:
    """Markdown table of the ablation."""
    names = list(dict.fromkeys(m for r in rows for m in r.branch_miou))
    header = "| model | pixel acc | mean acc | mIoU | mIoU sign-a/b (XOR) | branch mIoU "
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
