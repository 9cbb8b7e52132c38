"""The demo: CEN against the same network on each single modality, on the embedded data.

Trains three models with the ``synthetic`` preset (RGB only, depth only, CEN on RGB-D),
each evaluated on the validation split, and prints pixel acc / mean acc / mIoU per head.
"""

from __future__ import annotations

from dataclasses import replace

from cenfusion.engine.run import RunLog, log
from cenfusion.errors import CenError
from cenfusion.segmentation.config import SYNTHETIC, SegmentationConfig
from cenfusion.segmentation.train import Scores, train

RUNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("rgb-only", ("rgb",)),
    ("depth-only", ("depth",)),
    ("cen", ("rgb", "depth")),
)


def run_demo(base: SegmentationConfig = SYNTHETIC) -> dict[str, Scores]:
    """Train the three models of the comparison; returns their best validation scores."""
    results: dict[str, Scores] = {}
    with RunLog():
        for name, modalities in RUNS:
            cfg = replace(base, exp=f"demo-{name}", modalities=modalities)
            log.info(f"=== {name}: {' + '.join(modalities)} ===")
            best = train(cfg, force=True)
            if best.metrics is None:
                raise CenError(f"demo {name}: no epoch was trained (--epochs {list(cfg.epochs)})")
            results[name] = best.metrics
        log.info(demo_table(results))
    return results


def demo_table(results: dict[str, Scores]) -> str:
    """Markdown table: single-modality models, then every head of CEN."""
    rows = [
        ("RGB only", results["rgb-only"]["rgb"]),
        ("depth only", results["depth-only"]["depth"]),
    ]
    cen = results["cen"]
    rows += [(f"CEN, {head} head", scores) for head, scores in cen.items() if head != "ensemble"]
    rows.append(("CEN, ensemble", cen["ensemble"]))
    lines = [
        "| model | pixel acc | mean acc | mIoU |",
        "|---|---:|---:|---:|",
    ]
    lines += [
        f"| {label} | {s['pixel_acc']:.2f} | {s['mean_acc']:.2f} | {s['miou']:.2f} |"
        for label, s in rows
    ]
    return "\n".join(lines)
