"""cenfusion: deep multimodal fusion by channel exchanging (CEN) for dense prediction."""

from cenfusion.engine.threads import passive_wait_policy

passive_wait_policy()  # before torch loads OpenMP: see cenfusion.engine.threads

from cenfusion.errors import CenError
from cenfusion.fusion import (
    AlphaEnsemble,
    ModalityBatchNorm2d,
    ModalityInstanceNorm2d,
    convert,
    exchange_stats,
    sparsity_penalty,
)
from cenfusion.models.official import load_official_checkpoint
from cenfusion.models.refinenet import CENRefineNet, create_cen_refinenet
from cenfusion.models.registry import create_model, list_models

__all__ = [
    "AlphaEnsemble",
    "CENRefineNet",
    "CenError",
    "ModalityBatchNorm2d",
    "ModalityInstanceNorm2d",
    "convert",
    "create_cen_refinenet",
    "create_model",
    "exchange_stats",
    "list_models",
    "load_official_checkpoint",
    "sparsity_penalty",
]
