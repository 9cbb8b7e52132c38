"""Fidelity to the released CEN image-to-image networks.

``data/released_i2i_outputs.pt`` (described in ``data/README.md``) holds what the released
``Generator(3, 8, 3)`` and ``Discriminator(6, 8, 1)`` (unchanged, CPU fp32, training mode,
dropout 0) output for two modalities on weights given by the deterministic rule below and on
fixed inputs. We write those weights as the released training script saves them, convert
them with our importer and require the same outputs.
"""

import zlib
from pathlib import Path

import pytest
import torch

from cenfusion.errors import CenError
from cenfusion.fusion import exchanging_norms
from cenfusion.models.official_translation import load_official_translation

GOLDEN = Path(__file__).parent / "data" / "released_i2i_outputs.pt"


def _released_weight(key: str, shape: list[int]) -> torch.Tensor:
    """The golden file's weight rule: every key drawn from its own crc32-seeded generator."""
    g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    if key == "alpha":
        return torch.randn(shape, generator=g)
    if key.endswith("num_batches_tracked"):
        return torch.zeros(shape, dtype=torch.int64)
    if key.endswith("running_mean"):
        return torch.zeros(shape)
    if key.endswith("running_var"):
        return torch.ones(shape)
    if "insnorm" in key and key.endswith("weight"):
        w = torch.rand(shape, generator=g) * 0.5 + 0.5
        if "insnorm_conv" in key:
            low = torch.rand(shape, generator=g) < 0.3
            small = (torch.rand(shape, generator=g) - 0.5) * 0.01
            w = torch.where(low, small, w)
        return w
    if "insnorm" in key and key.endswith("bias"):
        return torch.randn(shape, generator=g) * 0.1
    if len(shape) == 4 or (len(shape) == 1 and key.endswith("bias")):
        return torch.randn(shape, generator=g) * 0.05
    raise AssertionError(f"the weight rule has no case for {key} {shape}")


@pytest.fixture(scope="module")
def golden() -> dict:
    return torch.load(GOLDEN, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def inputs(golden) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x0, x1, y = (torch.randn(1, 3, 256, 256, generator=g) for _ in range(3))
    sums = [float(t.double().sum()) for t in (x0, x1, y)]
    assert sums == pytest.approx(golden["input_checksums"], rel=1e-9)
    return [x0, x1, y]


def _relative(ours: torch.Tensor, released: torch.Tensor) -> float:
    return float((ours - released).norm() / released.norm())


@pytest.fixture(scope="module")
def converted(golden, tmp_path_factory) -> tuple:
    """The released files written by the weight rule, read back by our importer."""
    folder = tmp_path_factory.mktemp("released")
    for part in ("generator", "discriminator"):
        state = {k: _released_weight(k, s) for k, s in golden[f"{part}_keys"].items()}
        torch.save(state, folder / f"checkpoint-{part[:3]}-300.pkl")
    return load_official_translation(
        folder / "checkpoint-gen-300.pkl", folder / "checkpoint-dis-300.pkl", golden["threshold"]
    )


def _relative(ours: torch.Tensor, released: torch.Tensor) -> float:
    return float((ours - released).norm() / released.norm())


def test_released_generator_weights_give_released_outputs(golden, inputs, converted) -> None:
    generator = converted[0]
    config = generator.config
    assert (config.ngf, config.num_downs, config.num_modalities) == (golden["ngf"], 8, 2)
    assert sum(int(n.exchange_mask().sum()) for _, n in exchanging_norms(generator)) > 0
    with torch.no_grad():
        for module in generator.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        outputs = generator.train()(inputs[:2])
    stored = golden["generator_outputs_every_8th_pixel"]
    for name, ours, theirs in zip(("branch 0", "branch 1", "ensemble"), outputs, stored):
        rel = _relative(ours[:, :, ::8, ::8], theirs)
        assert rel < 1e-5, f"{name}: relative error {rel:.3g}"


def test_released_discriminator_weights_give_released_outputs(golden, inputs, converted) -> None:
    generator, discriminator = converted
    assert discriminator.config.ndf == golden["ndf"]
    x, y = torch.cat(inputs[:2]), torch.cat([inputs[2], inputs[2]])
    with torch.no_grad():
        for module in generator.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        fakes = generator.train()(inputs[:2])
        real = discriminator.train()(torch.cat([x, y], 1))
        fake = discriminator(torch.cat([x, torch.cat([fakes[0], fakes[1]])], 1))
    for kind, ours, theirs in (
        ("real", real, golden["discriminator_real"]),
        ("fake", fake, golden["discriminator_fake"]),
    ):
        for m in range(2):
            rel = _relative(torch.sigmoid(ours[m : m + 1]), theirs[m])
            assert rel < 1e-5, f"{kind} pair of modality {m}: relative error {rel:.3g}"


def test_a_key_without_a_place_is_refused(golden, tmp_path) -> None:
    state = {k: _released_weight(k, s) for k, s in golden["generator_keys"].items()}
    state["conv3.extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "g.pkl")
    with pytest.raises(CenError, match="'conv3.extra.weight' has no place in the generator"):
        load_official_translation(tmp_path / "g.pkl", None)
    del state["conv3.extra.weight"], state["deconv3.deconv.module.bias"]
    torch.save(state, tmp_path / "g.pkl")
    with pytest.raises(CenError, match="lacks key 'deconv3.deconv.module.bias'"):
        load_official_translation(tmp_path / "g.pkl", None)
