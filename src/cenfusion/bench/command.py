"""``cen bench``: latency and throughput of CEN networks in the protocol the RGB-D field
reports: a named device and precision, batch 1 at 480x640 for segmentation, warm-up steps,
then timed steps with their mean and spread. Rows: the per-modality reference (the released
way of computing, checked first to compute the same function), then cenfusion in each
precision asked for, with the run-time settings (channels-last, compile), and optionally the
exported segmentation model in ONNX Runtime; each for inference and, if asked, a training
step at the training crop and (translation) the FID scoring of validation views. Every row
gives images per second, peak device memory (CUDA), FLOPs per image, the share of a
matrix peak measured in the same run and its floor: the time its operators would take
at that peak or at the memory bandwidth measured too, whichever bounds each; with --profile,
where its time goes.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import fields

from cenfusion.bench.options import BenchOptions
from cenfusion.engine.config import add_config_flags, options_from_args
from cenfusion.engine.files import atomic_write
from cenfusion.engine.run import RuntimeConfig

__all__ = ["add_bench_parser"]


def _bench(args: argparse.Namespace) -> None:
    from cenfusion.bench.runner import format_profiles, format_table, run_bench

    options = options_from_args(BenchOptions, args)
    result = run_bench(options, options_from_args(RuntimeConfig, args))
    print(format_table(result))
    if options.json is not None:
        text = json.dumps(result, indent=2) + "\n"
        atomic_write(options.json, lambda f: f.write(text.encode()))
        print(f"wrote {options.json}")
    if options.profile is not None:
        profiles = format_profiles(result)
        atomic_write(options.profile, lambda f: f.write(profiles.encode()))
        print(f"wrote {options.profile}")


def add_bench_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``cen bench`` to ``cen``'s subparsers."""
    p = subparsers.add_parser(
        "bench",
        help="latency and throughput: the reference and cenfusion side by side",
        description=__doc__.replace("``", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_flags(p, BenchOptions)
    # each row names its precision (--precisions): no --amp, --amp-dtype
    runtime = tuple(f.name for f in fields(RuntimeConfig) if not f.name.startswith("amp"))
    add_config_flags(p, RuntimeConfig, only=runtime)
    p.set_defaults(run=_bench)
