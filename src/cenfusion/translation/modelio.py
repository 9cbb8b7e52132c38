"""Translation checkpoints from the released CEN files (``cen convert-official``)."""

from __future__ import annotations

import re
from pathlib import Path

from cenfusion.engine.checkpoint import save_checkpoint
from cenfusion.models.official_translation import load_official_translation
from cenfusion.models.unet import CENUNet

TASK = "translation"


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
