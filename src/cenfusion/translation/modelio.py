"""Translation generators to and from checkpoints, released CEN files included."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cenfusion.data.taskonomy import DOMAINS
from cenfusion.engine.checkpoint import load_checkpoint, load_weights, save_checkpoint
from cenfusion.errors import CenError, ForeignCheckpointError
from cenfusion.models.official_translation import load_official_translation
from cenfusion.models.unet import CENUNet, CENUNetConfig

TASK = "translation"
#: The side the released recipe validates at (its crop size).
RELEASED_SIDE = 256


def generator_from_record(state: dict[str, Any], where: str) -> CENUNet:
    """The generator of a translation checkpoint's record."""
    model = CENUNet(CENUNetConfig.from_dict(state["model_config"]))
    load_weights(model, state["model"], where)
    return model


@dataclass(frozen=True)
class LoadedGenerator:
    """A generator read from a file, with what the file says of it: the input domains in
    branch order and the target domain (``None`` when the file does not say, e.g. a
    released one), the side its run validated at, and whether that run evaluated with the
    generator's dropout active (the released way)."""

    model: CENUNet
    inputs: tuple[str, ...] | None
    target: str | None
    side: int
    dropout: bool


def load_generator(path: str | Path) -> LoadedGenerator:
    """Read a cenfusion translation checkpoint or a released ``checkpoint-gen-N.pkl`` (told
    apart automatically)."""
    path = Path(path)
    try:
        state = load_checkpoint(path, task=TASK)
    except ForeignCheckpointError:
        try:
            model, _ = load_official_translation(path, None)
        except CenError as theirs:
            reason = str(theirs).removeprefix(f"{path}: ")
            raise CenError(
                f"{path}: neither a cenfusion translation checkpoint nor a released CEN "
                f"generator ({reason})"
            ) from theirs
        return LoadedGenerator(model, None, None, RELEASED_SIDE, True)
    model = generator_from_record(state, str(path))
    config = state.get("config") or {}
    types = config.get("img_types")
    inputs = target = None
    if isinstance(types, list) and all(isinstance(t, int) and 0 <= t < len(DOMAINS) for t in types):
        inputs, target = tuple(DOMAINS[t] for t in types[:-1]), DOMAINS[types[-1]]
    side = int(config.get("crop_size", RELEASED_SIDE))
    return LoadedGenerator(model, inputs, target, side, bool(config.get("eval_dropout", True)))


def convert_official(
    generator: str | Path,
    discriminator: str | Path | None,
    out: str | Path,
    threshold: float = 1e-2,
) -> CENUNet:
    """Write the released ``checkpoint-gen-N.pkl`` (and ``checkpoint-dis-N.pkl``) as one
    cenfusion translation checkpoint at ``out``: ``cen i2i train --evaluate --resume OUT``
    evaluates it, ``--resume OUT`` continues training after epoch ``N`` (read from the file
    name, else 0) with fresh optimiser state. The settings the networks fix (widths, levels,
    threshold) are saved as the checkpoint's config, so that those commands need no flags
    for them; the domains the files were trained on are not known. Returns the generator."""
    net, judge = load_official_translation(generator, discriminator, threshold)
    done = re.search(r"-(\d+)\.pkl$", Path(generator).name)
    fixed = {"ngf": net.config.ngf, "num_downs": net.config.num_downs, "threshold": threshold}
    state = {
        "task": TASK,
        "model_config": net.config.to_dict(),
        "model": net.state_dict(),
        "epoch": int(done[1]) if done else 0,
        "source": str(generator),
        "config": fixed,
    }
    if judge is not None:
        fixed["ndf"] = judge.config.ndf
        state.update(discriminator_config=judge.config.to_dict(), discriminator=judge.state_dict())
    save_checkpoint(out, state)
    return net
