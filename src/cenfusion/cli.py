"""The ``cen`` command: parses flags, builds typed configs, calls task functions."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from cenfusion.errors import CenError

Command = Callable[[argparse.Namespace], None]


def _forward_demo(args: argparse.Namespace) -> None:
    import torch

    from cenfusion import create_cen_refinenet, exchange_stats

    torch.manual_seed(args.seed)
    model = create_cen_refinenet(depth=args.enc, num_classes=40, num_modalities=2).eval()
    params = sum(p.numel() for p in model.parameters())
    inputs = [torch.randn(1, 3, args.size, args.size) for _ in range(2)]
    with torch.no_grad():
        outs = model(inputs)
    print(f"CEN RefineNet ResNet-{args.enc}: {params / 1e6:.1f} M parameters")
    print(f"heads: {', '.join(str(tuple(o.shape)) for o in outs)} (rgb, depth, ensemble)")
    print(f"exchange fraction (penalised gammas below threshold): {exchange_stats(model).overall:.3f}")


def _convert_official(args: argparse.Namespace) -> None:
    from cenfusion.segmentation.modelio import convert_official

    model = convert_official(args.checkpoint, args.out)
    c = model.config
    print(f"wrote {args.out}: {c.backbone}, {c.num_classes} classes, {c.num_modalities} modalities")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cen", description="CEN multimodal fusion")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="forward pass of a CEN model on random input")
    demo.add_argument("--enc", type=int, default=101, choices=(50, 101, 152))
    demo.add_argument("--size", type=int, default=128)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_forward_demo)

    conv = sub.add_parser("convert-official", help="released CEN .pth.tar -> cenfusion checkpoint")
    conv.add_argument("checkpoint", type=Path)
    conv.add_argument("out", type=Path)
    conv.set_defaults(run=_convert_official)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except CenError as err:
        print(f"cen: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cen: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
