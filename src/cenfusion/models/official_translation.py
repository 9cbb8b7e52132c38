"""Key map between the released CEN image-to-image checkpoints and our translation networks.

The released training script saves plain state dicts, ``checkpoint-gen-N.pkl`` (the
``Generator``) and ``checkpoint-dis-N.pkl`` (the ``Discriminator``); shared layers are
stored as ``<path>.module.<param>``. Generator: encoder block ``i`` is ``conv{i}``, decoder
block ``j`` ``deconv{j}``; a private norm keeps one module per modality
(``insnorm_conv.insnorm_{m}``, ``insnorm_deconv.insnorm_{m}``), where we keep one ``(M, C)``
tensor. Discriminator: layer ``i`` is ``conv{i}``, its norm one module shared by the branches
(``insnorm.module``).

The released blocks own norms they never apply (encoder blocks 1 and ``N``, decoder block
``N``, discriminator layers 1 and 5), and the generator's norms keep running statistics that
training mode, the only mode the released code runs them in, never reads. Those keys are
known and dropped; every other key must have its place, and every one of ours a source.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor

from cenfusion.errors import CenError
from cenfusion.models.patchgan import PatchDiscriminator, PatchGANConfig
from cenfusion.models.released import (
    check_state_dict,
    load_mapped,
    numpy_globals,
    read_released_file,
)
from cenfusion.models.unet import CENUNet, create_cen_unet

__all__ = [
    "discriminator_key_map",
    "generator_key_map",
    "is_released_generator",
    "load_official_translation",
    "read_released_state_dict",
]

_RUNNING = ("running_mean", "running_var", "num_batches_tracked")


def is_released_generator(state: dict) -> bool:
    """Whether ``state`` has the released translation generator's layout."""
    return any(re.fullmatch(r"(module\.)?deconv1\.deconv\.module\.weight", k) for k in state)


def released_kind(path: str | Path) -> str | None:
    """What a released CEN file holds: ``segmenter`` (a segmentation ``.pth.tar``),
    ``generator`` or ``discriminator`` (translation ``.pkl`` files); None for a file that is
    none of them or cannot be read (its converter then says why)."""
    try:
        state = read_released_file(Path(path), numpy_globals())
    except CenError:
        return None
    if not isinstance(state, dict):
        return None
    if "segmenter" in state:
        return "segmenter"
    if is_released_generator(state):
        return "generator"
    layers = [k for k in state if re.fullmatch(r"(module\.)?conv\d\.conv\.module\.weight", k)]
    return "discriminator" if layers else None


def read_released_state_dict(path: str | Path) -> dict[str, Tensor]:
    """A released ``.pkl`` state dict (read with weights_only), ``module.`` prefixes removed."""
    path = Path(path)
    state = read_released_file(path, numpy_globals())
    if isinstance(state, dict) and "segmenter" in state:
        raise CenError(f"{path}: a released segmentation checkpoint, expected a translation one")
    if not isinstance(state, dict):
        raise CenError(f"{path}: expected a state dict, found a {type(state).__name__}")
    check_state_dict(state, str(path))
    return {k.removeprefix("module."): v for k, v in state.items()}


def generator_key_map(model: CENUNet) -> dict[str, list[str]]:
    """Our generator's keys -> their released sources (several for a private norm's rows)."""
    n, m = model.config.num_downs, model.num_modalities
    sources: dict[str, list[str]] = {"ensemble.alpha": ["alpha"]}
    for part, released, block in (("down", "conv", "conv"), ("up", "deconv", "deconv")):
        for i in range(n):
            for param in ("weight", "bias"):
                sources[f"{part}.{i}.conv.{param}"] = [f"{released}{i + 1}.{block}.module.{param}"]
                if f"{part}.{i}.norm.{param}" in model.state_dict():
                    sources[f"{part}.{i}.norm.{param}"] = [
                        f"{released}{i + 1}.insnorm_{block}.insnorm_{k}.{param}" for k in range(m)
                    ]
    return sources


def discriminator_key_map(model: PatchDiscriminator) -> dict[str, list[str]]:
    """Our discriminator's keys -> their released sources."""
    sources: dict[str, list[str]] = {}
    convs = [i for i, layer in enumerate(model.layers) if isinstance(layer, torch.nn.Conv2d)]
    for number, index in enumerate(convs, start=1):
        for param in ("weight", "bias"):
            sources[f"layers.{index}.{param}"] = [f"conv{number}.conv.module.{param}"]
        norm = f"layers.{index + 1}."
        for key in model.state_dict():
            if key.startswith(norm):
                sources[key] = [f"conv{number}.insnorm.module.{key.removeprefix(norm)}"]
    return sources


def _unused_generator_key(key: str, num_downs: int) -> bool:
    match = re.fullmatch(r"(de)?conv(\d+)\.insnorm_(de)?conv\.insnorm_\d+\.(\w+)", key)
    if match is None:
        return False
    block, param = int(match[2]), match[4]
    return param in _RUNNING or block == num_downs or (not match[1] and block == 1)


def _unused_discriminator_key(key: str, num_convs: int) -> bool:
    match = re.fullmatch(r"conv(\d+)\.insnorm\.module\.\w+", key)
    return match is not None and int(match[1]) in (1, num_convs)


def load_official_translation(
    generator_path: str | Path, discriminator_path: str | Path | None, threshold: float = 1e-2
) -> tuple[CENUNet, PatchDiscriminator | None]:
    """Our generator (and discriminator) from released translation checkpoints; levels,
    widths and the number of modalities are read from the keys."""
    generator = _official_generator(generator_path, threshold)
    if discriminator_path is None:
        return generator, None
    return generator, _official_discriminator(discriminator_path)


def _official_generator(path: str | Path, threshold: float) -> CENUNet:
    where = str(path)
    state = read_released_state_dict(path)
    if not is_released_generator(state):
        raise CenError(f"{where}: not a released CEN translation generator (no deconv1 layer)")
    pattern = r"conv(\d+)\.conv\.module\.weight"
    levels = max((int(m[1]) for k in state if (m := re.fullmatch(pattern, k))), default=0)
    first = state.get("conv1.conv.module.weight")
    last = state.get(f"deconv{levels}.deconv.module.weight")
    modalities = {k.split(".")[2] for k in state if k.startswith("conv2.insnorm_conv.insnorm_")}
    if first is None or last is None or not modalities:
        raise CenError(
            f"{where}: incomplete released generator (encoder, decoder or norms missing)"
        )
    generator = create_cen_unet(
        num_modalities=len(modalities),
        in_channels=first.shape[1],
        out_channels=last.shape[1],
        ngf=first.shape[0],
        num_downs=levels,
        threshold=threshold,
    )
    unused = {k for k in state if _unused_generator_key(k, levels)}
    load_mapped(generator, state, generator_key_map(generator), "generator", where, unused)
    return generator


def _official_discriminator(path: str | Path) -> PatchDiscriminator:
    where = str(path)
    state = read_released_state_dict(path)
    if is_released_generator(state):
        raise CenError(f"{path}: a released generator, expected its discriminator (-dis-N.pkl)")
    convs = sorted(int(k[4]) for k in state if re.fullmatch(r"conv\d\.conv\.module\.weight", k))
    if not convs or "conv1.conv.module.weight" not in state:
        raise CenError(f"{where}: not a released CEN translation discriminator (no conv1 layer)")
    first = state["conv1.conv.module.weight"]
    config = PatchGANConfig(in_channels=first.shape[1], ndf=first.shape[0], n_layers=len(convs) - 2)
    discriminator = PatchDiscriminator(config)
    unused = {k for k in state if _unused_discriminator_key(k, len(convs))}
    sources = discriminator_key_map(discriminator)
    load_mapped(discriminator, state, sources, "discriminator", where, unused)
    return discriminator
