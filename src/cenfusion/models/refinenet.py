"""CEN RefineNet: a timm BatchNorm backbone in CEN form plus the full multi-path RefineNet.

Every convolution (encoder and decoder) is shared by the modalities; only the encoder's
BatchNorms are private, with channel exchange after each bottleneck's ``bn2``. The decoder
has no normalisation, reads its input channels from the backbone's ``feature_info`` and
follows the released system layer for layer
(Lin et al., RefineNet, CVPR 2017, as used by CEN).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cenfusion.arguments import check_count, check_non_negative, check_rate
from cenfusion.errors import CenError, shorten
from cenfusion.fusion import (
    RESNET_EXCHANGE_POINTS,
    AlphaEnsemble,
    convert,
    exchanging_norms,
    set_frozen_stats,
    split_modalities,
    stack_modalities,
)
from cenfusion.models.crp_pool import max_pool_5x5

RESNET_DEPTHS: dict[int, str] = {50: "resnet50", 101: "resnet101", 152: "resnet152"}
LOCAL_WEIGHT_SUFFIXES = {".pth", ".pt", ".tar", ".safetensors", ".bin"}
#: The encoder's feature levels that the decoder takes, by stride; ResNet's are timm's 1..4.
LEVEL_STRIDES = (4, 8, 16, 32)
RESNET_LEVELS = (1, 2, 3, 4)


def _hf_cache() -> str:
    from huggingface_hub.constants import HF_HUB_CACHE

    return str(HF_HUB_CACHE)


def conv3x3(in_channels: int, out_channels: int, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=bias)


class ResidualConvUnit(nn.Module):
    """``relu(x) + conv(relu(conv_b(relu(x))))``; the first conv has a bias, the second none.

    The residual is the *rectified* input, as the released RefineNet computes it. The ReLUs
    and the sum run in place (``x`` itself is rectified): in the decoder no other operation
    needs these tensors, and the level's largest activations are held once, not twice.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = conv3x3(channels, channels, bias=True)
        self.conv2 = conv3x3(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(x, inplace=True)
        return self.conv2(F.relu(self.conv1(x), inplace=True)).add_(x)


def rcu_block(channels: int, units: int) -> nn.Sequential:
    return nn.Sequential(*(ResidualConvUnit(channels) for _ in range(units)))


class ChainedResidualPool(nn.Module):
    """Chain of ``[maxpool 5x5 stride 1, conv3x3]``, each output added to the running sum."""

    def __init__(self, channels: int, stages: int = 4) -> None:
        super().__init__()
        self.convs = nn.ModuleList(conv3x3(channels, channels) for _ in range(stages))

    def forward(self, x: Tensor) -> Tensor:
        top = x
        for conv in self.convs:
            top = conv(max_pool_5x5(top))
            x = x + top
        return x


class RefineStage(nn.Module):
    """One RefineNet level.

    ``reduce`` (in -> width), RCU(2), optionally ``fuse`` (width -> width) plus the upsampled
    deeper path, ReLU, CRP(4), RCU(3), optionally ``project`` (width -> out) and bilinear
    upsampling (``align_corners=True``) to the next level's size.
    """

    def __init__(self, in_channels: int, width: int, out_channels: int | None, fuse: bool):
        super().__init__()
        self.reduce = conv3x3(in_channels, width)
        self.rcu_in = rcu_block(width, 2)
        self.fuse = conv3x3(width, width) if fuse else None
        self.crp = ChainedResidualPool(width)
        self.rcu_out = rcu_block(width, 3)
        self.project = conv3x3(width, out_channels) if out_channels is not None else None

    def forward(self, x: Tensor, deeper: Tensor | None, out_size: Sequence[int] | None) -> Tensor:
        """``deeper`` (the previous stage's output) is consumed: the fused sum and its ReLU are
        written into it, so that the stage's largest level holds one tensor where it held
        three (the caller keeps a reference to ``deeper`` during the call)."""
        x = self.rcu_in(self.reduce(x))
        if self.fuse is not None:
            x = deeper.add_(self.fuse(x))
        x = self.rcu_out(self.crp(F.relu(x, inplace=True)))
        if self.project is not None:
            x = F.interpolate(
                self.project(x), size=tuple(out_size), mode="bilinear", align_corners=True
            )
        return x


class RefineNetDecoder(nn.Module):
    """Multi-path RefineNet over four encoder levels (strides 4, 8, 16, 32).

    ``in_channels``: channels of the levels, shallow to deep (ResNet: 256, 512, 1024, 2048).
    Dropout (``drop_rate``) acts on the two deepest levels and before the classifier.
    Output: logits ``(N, num_classes, h1, w1)`` at the shallowest level's resolution.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        drop_rate: float = 0.5,
        deep_width: int = 512,
        width: int = 256,
    ) -> None:
        super().__init__()
        if len(in_channels) != 4:
            raise ValueError(f"RefineNet needs 4 encoder levels, got {len(in_channels)}")
        deep_to_shallow = list(in_channels)[::-1]
        self.dropout = nn.Dropout(drop_rate)
        self.stages = nn.ModuleList(
            [RefineStage(deep_to_shallow[0], deep_width, width, fuse=False)]
            + [RefineStage(c, width, width, fuse=True) for c in deep_to_shallow[1:3]]
            + [RefineStage(deep_to_shallow[3], width, None, fuse=True)]
        )
        self.classifier = conv3x3(width, num_classes, bias=True)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        l1, l2, l3, l4 = features
        levels = [self.dropout(l4), self.dropout(l3), l2, l1]
        x: Tensor | None = None
        for i, stage in enumerate(self.stages):
            out_size = levels[i + 1].shape[-2:] if i + 1 < len(levels) else None
            x = stage(levels[i], x, out_size)
        return self.classifier(self.dropout(x))


@dataclass(frozen=True)
class CENRefineNetConfig:
    """Everything needed to rebuild a :class:`CENRefineNet` (saved inside checkpoints)."""

    backbone: str = "resnet101"
    num_classes: int = 40
    num_modalities: int = 2
    bn_threshold: float = 2e-2
    drop_rate: float = 0.5
    exchange_at: tuple[str, ...] = RESNET_EXCHANGE_POINTS
    ensemble_detach: bool = True
    decoder_width: int = 256
    decoder_deep_width: int = 512
    encoder_levels: tuple[int, ...] | None = None
    """The backbone's timm feature levels the decoder takes; None: those at strides 4..32."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> CENRefineNetConfig:
        """From a checkpoint's record; one saved without its levels was built on 1..4."""
        d = dict(d)
        d["exchange_at"] = tuple(d.get("exchange_at", RESNET_EXCHANGE_POINTS))
        d["encoder_levels"] = tuple(d.get("encoder_levels", RESNET_LEVELS))
        return cls(**d)


class CENRefineNet(nn.Module):
    """CEN segmentation network: shared encoder/decoder, private BNs, alpha ensemble.

    ``forward(inputs)``: a list of ``M`` tensors ``(B, 3, H, W)`` or the stacked
    ``(M*B, 3, H, W)``; returns the stacked logits ``(M + 1, B, K, ceil(H/4), ceil(W/4))``,
    one head per modality in input order, the ensemble last.

    ``size_multiple``: 1 when the encoder takes any input size (ResNet); else inputs are
    padded with zeros at the bottom and right to a multiple of it, as mmsegmentation's
    ``size_divisor``, and the logits cropped back (HRNet and DLA fuse branches of different
    strides, TResNet folds space into channels: each refuses an odd side).
    """

    def __init__(self, config: CENRefineNetConfig, encoder: nn.Module | None = None) -> None:
        super().__init__()
        if encoder is None:
            encoder = create_encoder(config.backbone, levels=config.encoder_levels)
        self.config = replace(config, encoder_levels=tuple(encoder.feature_info.out_indices))
        self.size_multiple = 1 if _ANY_SIZE.fullmatch(config.backbone) else size_multiple(encoder)
        self.encoder = convert(
            encoder, config.num_modalities, config.exchange_at, config.bn_threshold
        )
        self.decoder = RefineNetDecoder(
            self.encoder.feature_info.channels(),
            config.num_classes,
            config.drop_rate,
            deep_width=config.decoder_deep_width,
            width=config.decoder_width,
        )
        self.ensemble = AlphaEnsemble(config.num_modalities, detach=config.ensemble_detach)

    @property
    def num_modalities(self) -> int:
        return self.config.num_modalities

    def forward_stacked(self, x: Tensor) -> Tensor:
        """Stacked ``(M*B, 3, H, W)`` -> per-modality logits ``(M, B, K, h, w)``."""
        height, width = x.shape[-2:]
        step = self.size_multiple
        below, right = padding_to(height, step), padding_to(width, step)
        # a traced graph takes multiples of the step (the ONNX export's check), unpadded
        if step == 1 or torch.jit.is_tracing() or not (below or right):
            return split_modalities(self.decoder(self.encoder(x)), self.num_modalities)
        padded = F.pad(x, (0, right, 0, below))
        logits = self.decoder(self.encoder(padded))[..., : (height + 3) // 4, : (width + 3) // 4]
        return split_modalities(logits, self.num_modalities)

    def forward(self, inputs: Sequence[Tensor] | Tensor) -> Tensor:
        heads = self.forward_stacked(stack_modalities(inputs, self.num_modalities))
        return torch.cat([heads, self.ensemble(heads)[None]])

    def encoder_parameters(self) -> list[nn.Parameter]:
        """Parameters of the encoder (the lower learning rate group of the recipe)."""
        return list(self.encoder.parameters())

    def decoder_parameters(self) -> list[nn.Parameter]:
        """Decoder, classifier and ensemble weights (the higher learning rate group)."""
        encoder_ids = {id(p) for p in self.encoder.parameters()}
        return [p for p in self.parameters() if id(p) not in encoder_ids]


#: An odd input side, which an encoder that needs a multiple of its stride refuses.
_ODD_SIZE = (33, 47)
#: Backbones known to take any size (timm's ResNets), spared the trial.
_ANY_SIZE = re.compile(r"resnet\d+[a-z]?(_narrow)?")


def padding_to(side: int, step: int) -> int:
    """What pads ``side`` to a multiple of ``step``; by floor division alone, which compiled
    code takes with symbolic sizes (a modulo failed inductor)."""
    return (side + step - 1) // step * step - side


def size_multiple(encoder: nn.Module) -> int:
    """1 when ``encoder`` (a timm feature backbone) runs on an odd input size, else its
    largest feature stride, where it runs on that size padded to the stride (else 1: the
    encoder's own error then says what it needs). Tried in eval mode, without gradients,
    on the encoder's device (a meta encoder computes nothing); each module's mode is kept."""
    step = max(encoder.feature_info.reduction())
    padded = tuple(side + padding_to(side, step) for side in _ODD_SIZE)
    if _runs_at(encoder, _ODD_SIZE) or not _runs_at(encoder, padded):
        return 1
    return step


def _runs_at(encoder: nn.Module, size: tuple[int, ...]) -> bool:
    parameter = next(encoder.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None else torch.float32
    modes = {module: module.training for module in encoder.modules()}
    encoder.eval()
    try:
        with torch.no_grad():
            encoder(torch.zeros(1, 3, *size, device=device, dtype=dtype))
    except (RuntimeError, ValueError, AssertionError):
        return False
    finally:
        for module, training in modes.items():
            module.training = training
    return True


def create_encoder(
    backbone: str, pretrained: str | Path | None = None, levels: tuple[int, ...] | None = None
) -> nn.Module:
    """A timm feature backbone: its feature ``levels`` (default: those at strides 4, 8, 16
    and 32), optionally with ImageNet weights.

    ``pretrained``: a timm pretrained tag (``"tv_in1k"``: torchvision's weights, as released)
    or a path to a local state dict (``.pth``/``.safetensors``, classifier keys ignored; an
    existing file, or a name with a folder, is a path).
    """
    if isinstance(backbone, nn.Module):
        raise CenError(
            f"backbone=<{type(backbone).__name__} module>: expected a timm model name (a "
            "network of one's own takes channel exchange with cenfusion.convert)"
        )
    if not isinstance(backbone, str):
        raise CenError(f"backbone={backbone!r}: expected a timm model name")
    if pretrained is True:
        return _features_at_strides(backbone, levels, True)
    local = pretrained is not None and (
        Path(pretrained).suffix in LOCAL_WEIGHT_SUFFIXES
        or any(sep in str(pretrained) for sep in ("/", os.sep))
        or Path(pretrained).is_file()
    )
    remote = pretrained is not None and not local
    name = f"{backbone}.{pretrained}" if remote else backbone
    encoder = _features_at_strides(name, levels, remote)
    if local:
        _load_local_weights(encoder, Path(pretrained))
    return encoder


def _features_at_strides(name: str, levels: tuple[int, ...] | None, remote: bool) -> nn.Module:
    """timm's ``features_only`` model ``name`` (``backbone.tag``) at ``levels``, default those
    at strides 4..32: ResNet's indices first, then, for another family, those a probe finds."""
    backbone = name.partition(".")[0]
    try:
        encoder = _features(name, levels or RESNET_LEVELS, remote)
    except IndexError:  # fewer levels than ResNet's five
        encoder = None
    off_strides = encoder is None or tuple(encoder.feature_info.reduction()) != LEVEL_STRIDES
    if levels is None and off_strides:
        return _features(name, _levels_at_strides(backbone), remote)
    if encoder is None:
        raise CenError(f"backbone {backbone}: has no feature levels {list(levels)}")
    return encoder


def _features(name: str, levels: tuple[int, ...] | None, pretrained: bool) -> nn.Module:
    """timm's ``features_only`` model ``name`` giving its feature levels ``levels`` (None:
    timm's default, usually all)."""
    chosen = {} if levels is None else {"out_indices": levels}
    try:
        return timm.create_model(name, features_only=True, pretrained=pretrained, **chosen)
    except (RuntimeError, ValueError) as err:
        raise CenError(f"backbone {name!r}: {shorten(str(err), 120)}") from err
    except OSError as err:
        raise CenError(
            f"pretrained weights {name!r} not fetched ({type(err).__name__}); offline, give "
            f"a local file (--pretrained PATH) or fill the caches {_hf_cache()}, "
            f"{torch.hub.get_dir()}"
        ) from err


def _levels_at_strides(backbone: str) -> tuple[int, ...]:
    """The indices of ``backbone``'s timm feature levels at :data:`LEVEL_STRIDES` (a VGG has a
    level at stride 1 first, a ConvNeXt-style network starts at stride 4)."""
    probe = _features(backbone, None, False)
    strides = probe.feature_info.reduction()
    if not set(LEVEL_STRIDES) <= set(strides):
        raise CenError(
            f"backbone={backbone!r} (--backbone): its feature levels have strides {strides}; "
            "CEN RefineNet "
            f"needs levels at strides {', '.join(map(str, LEVEL_STRIDES))}"
        )
    indices = probe.feature_info.out_indices
    return tuple(indices[strides.index(stride)] for stride in LEVEL_STRIDES)


def _load_local_weights(encoder: nn.Module, path: Path) -> None:
    if not path.is_file():
        raise CenError(f"pretrained={str(path)!r} (--pretrained): file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CenError(
            f"pretrained={str(path)!r} (--pretrained): not a readable state dict ({err})"
        ) from err
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    expected = encoder.state_dict().keys()
    state = {k: v for k, v in state.items() if k in expected}
    missing = [k for k in expected if k not in state]
    if missing:
        raise CenError(
            f"pretrained={str(path)!r} (--pretrained): lacks backbone weight {missing[0]!r}"
        )
    encoder.load_state_dict(state)


def create_cen_refinenet(
    depth: int = 101,
    num_classes: int = 40,
    num_modalities: int = 2,
    bn_threshold: float = 2e-2,
    pretrained: str | Path | bool | None = None,
    backbone: str | None = None,
    drop_rate: float = 0.5,
    frozen_bn: bool | None = None,
    ensemble_detach: bool = True,
    decoder_width: int = 256,
    exchange: bool = True,
    exchange_at: Sequence[str] = RESNET_EXCHANGE_POINTS,
) -> CENRefineNet:
    """Build a CEN RefineNet.

    ``depth`` picks ResNet-50/101/152 (torchvision layout); ``backbone`` overrides it with
    any timm BatchNorm CNN name. ``pretrained`` is a timm tag or a local file; its BN
    statistics and affine parameters are copied into every modality. ``frozen_bn`` (default:
    on exactly when pretrained) keeps the BN running statistics fixed during training.
    ``num_modalities=1`` gives the same network on a single modality (no exchange), the
    baseline CEN is compared with. ``decoder_width`` (256 as released; the deepest RefineNet
    level uses twice that) can shrink the decoder for small CPU runs. ``exchange=False`` keeps
    shared convolutions, private BNs and the ensemble but exchanges nothing (the ablation).
    ``exchange_at``: ``fnmatch`` patterns on the encoder's BatchNorm names (default: every
    ResNet block's ``bn2``; one pattern may be a bare string); other families need their own,
    e.g. ``("blocks.*.*.bn2",)`` for EfficientNet (:func:`~cenfusion.fusion.conversion.convert`).
    ``pretrained=True`` takes timm's default weights for the backbone, ``False`` none.
    Without weights, an exchange point whose scales timm starts at zero (the last BN of a
    basic block) starts them at one, as torchvision's ResNet does: at zero every channel
    would be exchanged from the first step.
    """
    pretrained = None if pretrained is False else pretrained
    if backbone is None:
        if depth not in RESNET_DEPTHS:
            raise CenError(f"depth={depth!r} (--enc): expected one of {sorted(RESNET_DEPTHS)}")
        backbone = RESNET_DEPTHS[depth]
    for name, value in [
        ("num_classes", num_classes),
        ("num_modalities", num_modalities),
        ("decoder_width", decoder_width),
    ]:
        check_count(name, value)
    check_rate("drop_rate", drop_rate)
    check_non_negative("bn_threshold", bn_threshold)
    if isinstance(exchange_at, str):
        exchange_at = (exchange_at,)
    elif callable(exchange_at) or exchange_at is None:
        raise CenError(
            "exchange_at: expected fnmatch patterns, which the model's config records (a "
            "predicate works with cenfusion.convert)"
        )
    config = CENRefineNetConfig(
        backbone=backbone,
        num_classes=num_classes,
        num_modalities=num_modalities,
        bn_threshold=bn_threshold,
        drop_rate=drop_rate,
        ensemble_detach=ensemble_detach,
        exchange_at=tuple(exchange_at) if num_modalities > 1 and exchange else (),
        decoder_width=decoder_width,
        decoder_deep_width=2 * decoder_width,
    )
    model = CENRefineNet(config, create_encoder(backbone, pretrained))
    set_frozen_stats(model, pretrained is not None if frozen_bn is None else frozen_bn)
    if pretrained is None:
        with torch.no_grad():
            for _, norm in exchanging_norms(model):
                if not norm.weight.is_meta and not norm.weight.any():
                    norm.weight.fill_(1.0)
    return model
