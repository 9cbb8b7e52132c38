"""An exported CEN segmenter run by onnxruntime, called like the torch model.

``cen export onnx`` (:mod:`cenfusion.segmentation.export`) writes the file; prediction and
evaluation read it back through :class:`OnnxSegmenter`. ``onnx`` and ``onnxruntime`` are an
optional extra: ``pip install cenfusion[onnx]``.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from torch import Tensor

from cenfusion.errors import CenError
from cenfusion.models.refinenet import CENRefineNetConfig, padding_to

__all__ = ["METADATA_PREFIX", "OnnxSegmenter", "require"]

#: Prefix of the metadata keys (modalities, heads, class count, model config, depth scale).
METADATA_PREFIX = "cenfusion."
ONNX_EXTRA = "pip install cenfusion[onnx]"


def require(module: str) -> ModuleType:
    """Import an optional dependency of the ``[onnx]`` extra, or say in one line how to get it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise CenError(f"ONNX support needs the package {module}: {ONNX_EXTRA}") from None


ArrayLike = Tensor | np.ndarray


class OnnxSegmenter:
    """An exported CEN segmenter run by onnxruntime, called like :class:`CENRefineNet`.

    ``segmenter(inputs)``: ``M`` arrays or tensors ``(B, 3, H, W)`` in modality order, or the
    stacked ``(M*B, 3, H, W)``; returns the float32 torch tensor ``(heads, B, K, h, w)`` of the
    outputs in order (``heads == "all"``: one per modality, then the ensemble; else the
    ensemble alone), on the device of the first torch input (CPU for numpy input).
    ``threads`` sets onnxruntime's intra-op threads (default: its own choice).
    """

    def __init__(
        self,
        path: str | Path,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        threads: int | None = None,
    ) -> None:
        ort = require("onnxruntime")
        self.path = Path(path)
        if not self.path.is_file():
            raise CenError(f"{self.path}: ONNX file not found")
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(
                str(self.path), sess_options=options, providers=list(providers)
            )
        except Exception as err:
            raise CenError(
                f"{self.path}: not a loadable ONNX model ({type(err).__name__})"
            ) from err
        meta = self.session.get_modelmeta().custom_metadata_map
        if METADATA_PREFIX + "modalities" not in meta:
            raise CenError(f"{self.path}: not exported by cenfusion (no modality metadata)")
        self.modalities: tuple[str, ...] = tuple(json.loads(meta[METADATA_PREFIX + "modalities"]))
        self.heads: str = meta[METADATA_PREFIX + "heads"]
        self.num_classes = int(meta[METADATA_PREFIX + "num_classes"])
        self.model_config: dict = json.loads(meta[METADATA_PREFIX + "model_config"])
        scale = meta.get(METADATA_PREFIX + "depth_scale")
        self.depth_scale: float | None = None if scale is None else float(scale)
        kinds = meta.get(METADATA_PREFIX + "kinds")
        self.kinds: tuple[str, ...] | None = None if kinds is None else tuple(json.loads(kinds))
        settings = meta.get(METADATA_PREFIX + "settings")
        self.settings: dict | None = None if settings is None else json.loads(settings)
        #: Sides a free-size graph takes (its backbone's stride; 1: any): others are padded.
        self.size_multiple = int(meta.get(METADATA_PREFIX + "size_multiple", "1"))
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._input_shapes = {i.name: i.shape for i in self.session.get_inputs()}

    @property
    def num_modalities(self) -> int:
        return len(self.modalities)

    @property
    def fixed_size(self) -> tuple[int, int] | None:
        """The ``(H, W)`` the graph was exported at, when it takes no other (not ``--dynamic``)."""
        height, width = next(iter(self._input_shapes.values()))[-2:]
        fixed = isinstance(height, int) and isinstance(width, int)
        return (height, width) if fixed else None

    @property
    def config(self) -> CENRefineNetConfig:
        """The exported network's config (classes, modalities), as the torch model has it."""
        return CENRefineNetConfig.from_dict(self.model_config)

    def to(self, device: torch.device | str) -> OnnxSegmenter:
        """onnxruntime runs on its own providers; outputs follow the inputs' device."""
        return self

    def eval(self) -> OnnxSegmenter:
        return self

    def __call__(self, inputs: Sequence[ArrayLike] | ArrayLike) -> Tensor:
        device = _first_device(inputs)
        arrays = [_to_numpy(x) for x in inputs] if isinstance(inputs, Sequence) else None
        if arrays is None:
            stacked = _to_numpy(inputs)
            if stacked.shape[0] % self.num_modalities:
                raise CenError(
                    f"{self.path}: stacked batch of {stacked.shape[0]} is not a multiple of "
                    f"{self.num_modalities} modalities"
                )
            arrays = list(np.split(stacked, self.num_modalities))
        if len(arrays) != self.num_modalities:
            raise CenError(
                f"{self.path}: the model takes {self.num_modalities} modalities "
                f"({', '.join(self.modalities)}), {len(arrays)} given"
            )
        feed = dict(zip(self.modalities, arrays))
        for name, array in feed.items():
            self._check_shape(name, array.shape)
        height, width = arrays[0].shape[-2:]
        step = self.size_multiple
        if self.fixed_size is None and (height % step or width % step):
            pad = ((0, 0), (0, 0), (0, padding_to(height, step)), (0, padding_to(width, step)))
            feed = {name: np.pad(array, pad) for name, array in feed.items()}
        outputs = self.session.run(None, feed)
        logits = np.stack(outputs)[..., : -(-height // 4), : -(-width // 4)]
        return torch.from_numpy(np.ascontiguousarray(logits)).to(device)

    def _check_shape(self, name: str, shape: tuple[int, ...]) -> None:
        """Refuse, in one line, an input the graph was not exported for (onnxruntime's own
        message is several lines long)."""
        expected = self._input_shapes[name]
        fits = len(shape) == len(expected) and all(
            not isinstance(e, int) or e == s for e, s in zip(expected, shape)
        )
        if not fits:
            wanted = "x".join(str(e) if isinstance(e, int) else "any" for e in expected)
            got = "x".join(map(str, shape))
            raise CenError(
                f"{self.path}: input {name} is {got}, the graph takes {wanted} "
                f"(export with --dynamic for any size)"
            )


def _to_numpy(x: ArrayLike) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def _first_device(inputs: Sequence[ArrayLike] | ArrayLike) -> torch.device:
    first = inputs[0] if isinstance(inputs, Sequence) else inputs
    return first.device if isinstance(first, Tensor) else torch.device("cpu")
