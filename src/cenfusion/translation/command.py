"""Command-line glue of the translation task: flags -> :class:`TranslationConfig` -> a call.

``cli.py`` adds the parsers below to its own (``cen i2i train ...``, ``cen data taskonomy ...``)
and calls ``args.run(args)``; everything under these functions takes typed arguments.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any

from cenfusion.data.class_names import TASKONOMY_DOMAINS as DOMAINS
from cenfusion.engine.config import add_config_flags, given_flags
from cenfusion.engine.run import add_run_flags, log
from cenfusion.errors import CenError
from cenfusion.translation.config import TranslationConfig
from cenfusion.translation.demo import DEMO

__all__ = ["DEMO_HELP", "DEMO_SCHEDULE", "add_data_parsers", "add_parsers", "demo"]

DEMO_HELP = "shading + texture -> RGB on the embedded scenes"
#: The demo's epochs.
DEMO_SCHEDULE = (DEMO.epochs,)

_TABLE = ", ".join(f"{i} {d}" for i, d in enumerate(DOMAINS))


def demo(flags: dict[str, Any], epochs: list[int] | None) -> None:
    """``cen demo --task i2i``, for ``epochs`` (one number) if given."""
    from cenfusion.translation.demo import run_translation_demo

    if epochs is not None and len(epochs) != 1:
        raise CenError(
            f"--epochs {' '.join(map(str, epochs))}: the translation demo takes one number"
        )
    schedule = {} if epochs is None else {"epochs": epochs[0]}
    run_translation_demo(replace(DEMO, **flags, **schedule))


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Add ``i2i train`` to ``subparsers`` (the ``cen`` command's)."""
    i2i = subparsers.add_parser("i2i", help="multimodal image-to-image translation (Taskonomy)")
    commands = i2i.add_subparsers(dest="i2i_command", required=True)
    p = commands.add_parser(
        "train",
        help="train a CEN U-Net (or evaluate one with --evaluate)",
        description="Train CEN image-to-image translation; every --val-every epochs the "
        "validation predictions are written to RUNS/EXP (input*/ fake*/ real/ best/) with "
        "FID/KID and L1/MSE. Settings: the checkpoint's own (with --resume or --evaluate), "
        "else the released recipe; then --config, then flags.",
    )
    add_run_flags(p)
    p.add_argument(
        "--evaluate", action="store_true", help="evaluate --resume PATH, else best.pth/last.pth"
    )
    add_config_flags(p, TranslationConfig)
    p.set_defaults(run=_run_train)


def _run_train(args: argparse.Namespace) -> None:
    from cenfusion.engine.session import run_command
    from cenfusion.translation.task import TRANSLATION

    run_command(
        TRANSLATION,
        given_flags(TranslationConfig, args),
        yaml_path=args.config,
        resume=args.resume,
        evaluate_only=args.evaluate,
        force=args.force,
    )


def add_data_parsers(data_subparsers: argparse._SubParsersAction) -> None:
    """Add ``taskonomy`` and ``synthetic-taskonomy`` to the ``cen data`` subcommands."""
    p = data_subparsers.add_parser(
        "taskonomy",
        help="download the Taskonomy sample building (only the domains asked for)",
        description="Fetch the 1000 train / 500 val views of CEN's split for each domain, one "
        "file at a time (resumable, present files skipped), and write train.txt / val.txt.",
    )
    p.add_argument("out", type=Path)
    p.add_argument(
        "--domains",
        nargs="+",
        default=["reshading", "edge_texture", "rgb"],
        help=f"names or img-type indices (default: reshading edge_texture rgb); {_TABLE}",
    )
    p.add_argument("--base-url", help="where <domain>/<file> lives (the released host)")
    p.add_argument("--workers", type=int, default=4, help="parallel downloads")
    p.set_defaults(run=_run_taskonomy)

    s = data_subparsers.add_parser(
        "synthetic-taskonomy",
        help="write synthetic indoor scenes in the Taskonomy layout (the embedded default)",
    )
    s.add_argument("out", type=Path)
    s.add_argument("--num-train", type=int, default=200)
    s.add_argument("--num-val", type=int, default=50)
    s.add_argument("--size", type=int, default=128)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(run=_run_synthetic)


def _run_taskonomy(args: argparse.Namespace) -> None:
    from cenfusion.data.taskonomy import DEFAULT_BASE_URL, prepare_taskonomy

    url = args.base_url or DEFAULT_BASE_URL
    out = prepare_taskonomy(args.out, args.domains, url, args.workers)
    log.info(f"wrote {out}: {', '.join(args.domains)}; train.txt, val.txt")


def _run_synthetic(args: argparse.Namespace) -> None:
    from cenfusion.data.synthetic_taskonomy import generate_taskonomy_dataset

    out = generate_taskonomy_dataset(args.out, args.num_train, args.num_val, args.size, args.seed)
    log.info(f"wrote {out}: {args.num_train} train / {args.num_val} val synthetic views")
