"""Channel-exchanging fusion, independent of any task.

Modalities travel stacked along the batch dimension, ``(M*B, C, H, W)``, modality major
(:mod:`~cenfusion.fusion.layout`). Layers with weights (convolutions, linear layers) are
shared and need no change: one call processes every modality. Normalisation layers are
private (:mod:`~cenfusion.fusion.norms`): they view the batch as ``(M, B, C, H, W)``, keep one
set of statistics and affine parameters per modality, and, at exchange points, replace each
channel whose ``|gamma|`` is under a threshold by the other modalities' value. An L1 penalty
on a disjoint part of each modality's gammas decides where that happens
(:mod:`~cenfusion.fusion.sparsity`); each modality predicts, and a learnt softmax(alpha)
ensemble gives the final output (:mod:`~cenfusion.fusion.ensemble`).
:func:`~cenfusion.fusion.conversion.convert` turns a BatchNorm CNN into this form.

The norms compute the same function faster where they can: :mod:`~cenfusion.fusion.fastpath`
holds that machinery, apart from the method.
"""

from cenfusion.fusion.conversion import (
    RESNET_EXCHANGE_POINTS,
    ExchangePointsError,
    ExchangeSelector,
    NoBatchNormError,
    convert,
)
from cenfusion.fusion.ensemble import AlphaEnsemble
from cenfusion.fusion.layout import split_modalities, stack_modalities
from cenfusion.fusion.norms import (
    ModalityBatchNorm2d,
    ModalityInstanceNorm2d,
    ModalityNorm,
    set_frozen_stats,
)
from cenfusion.fusion.sparsity import (
    ExchangeStats,
    exchange_stats,
    exchanging_norms,
    sparsity_penalty,
)

__all__ = [
    "RESNET_EXCHANGE_POINTS",
    "AlphaEnsemble",
    "ExchangePointsError",
    "ExchangeSelector",
    "ExchangeStats",
    "ModalityBatchNorm2d",
    "ModalityInstanceNorm2d",
    "ModalityNorm",
    "NoBatchNormError",
    "convert",
    "exchange_stats",
    "exchanging_norms",
    "set_frozen_stats",
    "sparsity_penalty",
    "split_modalities",
    "stack_modalities",
]
