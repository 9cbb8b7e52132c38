"""cenfusion: deep multimodal fusion by channel exchanging (CEN) for dense prediction.

- ``create_model(name, **kwargs)``, ``list_models()``: the registered networks;
  ``create_cen_refinenet(...)`` and ``CENRefineNet``: the CEN RefineNet for segmentation.
- ``load_official_checkpoint(path)``: a released CEN ``.pth.tar``, with its outputs;
  ``load_segmenter(path)``: any segmenter file (ours, released, exported ``.onnx``) with what
  it says of its inputs (modality names and kinds, depth scale), ``save_segmenter(model,
  path)`` the file it reads for a model of one's own; ``load_generator(path)``:
  a translation generator (ours or a released ``checkpoint-gen-N.pkl``) and its domains.
- ``convert(model, num_modalities)``: channel exchanging in any BatchNorm CNN; its parts
  ``ModalityBatchNorm2d``, ``ModalityInstanceNorm2d``, ``AlphaEnsemble``,
  ``sparsity_penalty`` and ``exchange_stats``.
- ``CenError``: bad input, said in one line.

These names are imported on first use, so that ``import cenfusion`` (and the ``cen``
command's ``--help``) does not pay for torch and timm until a model is needed.
"""

from importlib import import_module
from typing import Any

from cenfusion.engine.threads import passive_wait_policy

passive_wait_policy()  # before torch loads OpenMP: see cenfusion.engine.threads

from cenfusion.errors import CenError

_LAZY = {
    "AlphaEnsemble": "cenfusion.fusion",
    "ModalityBatchNorm2d": "cenfusion.fusion",
    "ModalityInstanceNorm2d": "cenfusion.fusion",
    "convert": "cenfusion.fusion",
    "exchange_stats": "cenfusion.fusion",
    "sparsity_penalty": "cenfusion.fusion",
    "load_official_checkpoint": "cenfusion.models.official",
    "load_segmenter": "cenfusion.segmentation.modelio",
    "save_segmenter": "cenfusion.segmentation.modelio",
    "load_generator": "cenfusion.translation.modelio",
    "CENRefineNet": "cenfusion.models.refinenet",
    "create_cen_refinenet": "cenfusion.models.refinenet",
    "create_model": "cenfusion.models.registry",
    "list_models": "cenfusion.models.registry",
}

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
    "load_generator",
    "load_official_checkpoint",
    "load_segmenter",
    "save_segmenter",
    "sparsity_penalty",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'cenfusion' has no attribute {name!r}")
    value = getattr(import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
