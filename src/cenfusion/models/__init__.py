"""Backbones, decoders and the registry of named CEN models."""

from cenfusion.models import resnet_narrow  # noqa: F401 - registers resnet26_narrow with timm
