"""The translation demo: shading + texture -> RGB on the embedded Taskonomy-style scenes.

A small CEN U-Net (64x64, 6 levels) trained on the synthetic views, whose colours follow from
what the two inputs show (:func:`cenfusion.data.render.predictable_scene`). Exchange starts
within the short schedule only with a generator learning rate above the released 2e-4: Adam
moves each penalised gamma by about ``lr_g`` per step whatever ``lamda`` is, so 1e-3 brings
them to the threshold after about 1000 steps (epoch 20). The run's report
shows the image grid (inputs, each branch, the ensemble, the target) and the FID/KID and L1
curves of every branch.
"""

from __future__ import annotations

from cenfusion.data.class_names import TASKONOMY_DOMAINS as DOMAINS
from cenfusion.engine.run import LogRouting, log
from cenfusion.translation.config import TranslationConfig

DEMO = TranslationConfig(
    exp="demo-i2i",
    img_types=(2, 7, 0),
    epochs=30,
    val_every=5,
    batch_size=4,
    crop_size=64,
    num_downs=6,
    ngf=32,
    ndf=32,
    lr_g=1e-3,
    lamda=2e-2,
    workers=2,
    seed=1,
)


def run_translation_demo(base: TranslationConfig = DEMO, report: bool = True) -> dict:
    """Train the demo generator; log and return the best epoch's metrics per branch."""
    from cenfusion.engine.session import train
    from cenfusion.translation.task import TRANSLATION

    with LogRouting():
        best = train(TRANSLATION, base, force=True)
        metrics = best.metrics or {}
        names = [f"{DOMAINS[t]} branch" for t in base.inputs] + ["ensemble"]
        for key in ("fid", "kid_x100", "l1"):
            if key in metrics:
                values = ", ".join(f"{n} {v:.3f}" for n, v in zip(names, metrics[key]))
                log.info(f"best epoch {best.epoch}, {key}: {values}")
        if report:
            log.info(f"report: {TRANSLATION.write_report(base.run_dir)}")
    return metrics
