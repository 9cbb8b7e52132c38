"""Named model variants: each a small registered builder, created by name."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from cenfusion.errors import CenError
from cenfusion.models.refinenet import create_cen_refinenet
from cenfusion.models.unet import create_cen_unet

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a builder under its function name."""
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    """The names :func:`create_model` builds, sorted."""
    return sorted(_REGISTRY)


def create_model(name: str, **kwargs: object) -> nn.Module:
    """Build the registered variant ``name``; keyword arguments go to its builder."""
    if name not in _REGISTRY:
        raise CenError(f"model {name!r}: expected one of {', '.join(list_models())}")
    return _REGISTRY[name](**kwargs)


def _fixed(name: str, family: str, kwargs: dict[str, object], **fixed: object) -> dict[str, object]:
    """``kwargs`` with the variant ``name``'s ``fixed`` arguments, which they must not set."""
    for key, value in fixed.items():
        if key in kwargs and kwargs[key] != value:
            said = f"its {key}" if value is None else f"{key}={value}"
            raise CenError(f"model {name} fixes {said}; use {family} for another {key}")
    return {**kwargs, **fixed}


@register_model
def cen_refinenet(**kwargs: object) -> nn.Module:
    """CEN RefineNet on any timm BatchNorm backbone (``backbone=...``, else ResNet ``depth``)."""
    return create_cen_refinenet(**kwargs)


@register_model
def cen_refinenet_r50(**kwargs: object) -> nn.Module:
    return create_cen_refinenet(
        **_fixed("cen_refinenet_r50", "cen_refinenet", kwargs, depth=50, backbone=None)
    )


@register_model
def cen_refinenet_r101(**kwargs: object) -> nn.Module:
    return create_cen_refinenet(
        **_fixed("cen_refinenet_r101", "cen_refinenet", kwargs, depth=101, backbone=None)
    )


@register_model
def cen_refinenet_r152(**kwargs: object) -> nn.Module:
    return create_cen_refinenet(
        **_fixed("cen_refinenet_r152", "cen_refinenet", kwargs, depth=152, backbone=None)
    )


@register_model
def cen_unet(**kwargs: object) -> nn.Module:
    """CEN U-Net of any depth (``num_downs``)."""
    return create_cen_unet(**kwargs)


@register_model
def pix2pix_unet256(**kwargs: object) -> nn.Module:
    """The released translation generator: 8 levels, 256x256 inputs."""
    return create_cen_unet(**_fixed("pix2pix_unet256", "cen_unet", kwargs, num_downs=8))


@register_model
def pix2pix_unet128(**kwargs: object) -> nn.Module:
    return create_cen_unet(**_fixed("pix2pix_unet128", "cen_unet", kwargs, num_downs=7))


@register_model
def pix2pix_unet64(**kwargs: object) -> nn.Module:
    """A 6-level generator for 64x64 CPU runs."""
    return create_cen_unet(**_fixed("pix2pix_unet64", "cen_unet", kwargs, num_downs=6))
