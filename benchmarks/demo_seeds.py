"""The segmentation demo (``cen demo``) for several seeds: its table as mean and spread per row.

Usage::

    python benchmarks/demo_seeds.py                # seeds 0 1 2, runs under runs/demo-seeds/
    python benchmarks/demo_seeds.py --write        # also put the table in benchmarks/RESULTS.md

Each seed is one whole ``run_demo`` (four models, the runs side by side as ``cen demo`` trains
them), timed on the wall clock. Run it alone on the machine: the demo's time is one of the
numbers. The table's checks are the demo's promises: CEN above CEN without exchange above the
better single modality (each by 2 mIoU points), CEN's sign-a/b mIoU 20 points above CEN
without exchange's, CEN's final exchanged fraction between 10% and 90%.
"""

from __future__ import annotations

import argparse
import platform
import re
import statistics
import time
from dataclasses import replace
from pathlib import Path

from cenfusion.engine.threads import available_cpus
from cenfusion.segmentation.config import SYNTHETIC
from cenfusion.segmentation.demo import RUNS, DemoRow, run_demo

RESULTS = Path(__file__).with_name("RESULTS.md")
BEGIN, END = "<!-- demo-seeds: begin -->", "<!-- demo-seeds: end -->"


def _spread(values: list[float], digits: int = 2) -> str:
    """``mean (min-max)``."""
    mean = statistics.fmean(values)
    return f"{mean:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def checks(rows: list[DemoRow]) -> dict[str, bool]:
    """The demo's promises for one seed's table."""
    by = {r.label: r for r in rows}
    cen, late = by["CEN"], by["CEN without exchange"]
    single = max(by["RGB only"].miou, by["depth only"].miou)
    layers = list(cen.exchanged_by_layer.values())
    return {
        "CEN >= no exchange + 2": cen.miou >= late.miou + 2,
        "no exchange >= best single + 2": late.miou >= single + 2,
        "signs: CEN >= no exchange + 20": cen.interaction_miou >= late.interaction_miou + 20,
        "exchanged in 10-90%": cen.exchanged is not None and 0.1 <= cen.exchanged <= 0.9,
        "layers differ": max(layers) - min(layers) > 0.05,
    }


def table(results: dict[int, tuple[list[DemoRow], float]]) -> str:
    seeds = sorted(results)
    lines = [
        f"Seeds {', '.join(map(str, seeds))}; mean (min-max) over seeds.",
        "",
        "| model | mIoU | mIoU sign-a/b | heads' mIoU rgb | heads' mIoU depth | exchanged |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for i, run in enumerate(RUNS):
        rows = [results[s][0][i] for s in seeds]
        heads = [
            _spread([r.branch_miou[m] for r in rows]) if m in rows[0].branch_miou else "-"
            for m in ("rgb", "depth")
        ]
        exchanged = (
            "-"
            if rows[0].exchanged is None
            else _spread([100 * r.exchanged for r in rows], 0) + " %"
        )
        lines.append(
            f"| {run.label} | {_spread([r.miou for r in rows])} | "
            f"{_spread([r.interaction_miou for r in rows])} | {heads[0]} | {heads[1]} | "
            f"{exchanged} |"
        )
    lines += ["", "| seed | wall time | " + " | ".join(checks(results[seeds[0]][0])) + " |"]
    lines.append("|---:|---:|" + "---|" * len(checks(results[seeds[0]][0])))
    for s in seeds:
        rows, seconds = results[s]
        marks = " | ".join("yes" if ok else "**no**" for ok in checks(rows).values())
        lines.append(f"| {s} | {seconds // 60:.0f} min {seconds % 60:.0f} s | {marks} |")
    return "\n".join(lines)


def write_results(text: str) -> None:
    """Put ``text`` between the markers at the top of RESULTS.md (replacing an earlier one)."""
    old = RESULTS.read_text()
    block = f"{BEGIN}\n{text}\n{END}"
    if BEGIN in old:
        new = re.sub(
            re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, old, flags=re.DOTALL
        )
    else:
        title, _, rest = old.partition("\n")
        new = f"{title}\n\n{block}\n{rest}"
    RESULTS.write_text(new)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--runs", type=Path, default=Path("runs/demo-seeds"))
    parser.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    args = parser.parse_args()
    results = {}
    for seed in args.seeds:
        began = time.perf_counter()
        rows = run_demo(replace(SYNTHETIC, seed=seed, runs=args.runs / f"seed{seed}"), report=True)
        results[seed] = (rows, time.perf_counter() - began)
    text = (
        f"## `cen demo` across seeds ({platform.processor() or platform.machine()}, "
        f"{available_cpus()} CPUs, {time.strftime('%Y-%m-%d')})\n\n"
        f"`python benchmarks/demo_seeds.py --write`\n\n{table(results)}"
    )
    print(text)
    if args.write:
        write_results(text)


if __name__ == "__main__":
    main()
