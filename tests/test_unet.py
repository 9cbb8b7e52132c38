import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cenfusion import CenError
from cenfusion.fusion import ModalityInstanceNorm2d, exchanging_norms, sparsity_penalty
from cenfusion.models.patchgan import create_patchgan
from cenfusion.models.unet import CENUNet, create_cen_unet, default_num_dropout


def loop_norm(norm: ModalityInstanceNorm2d, xs: list[torch.Tensor], exchange: bool) -> list:
    """Reference: one plain affine InstanceNorm per modality, exchange channel by channel."""
    ys = [
        F.instance_norm(x, weight=norm.weight[m], bias=norm.bias[m], eps=norm.eps)
        for m, x in enumerate(xs)
    ]
    if not exchange:
        return ys
    outs = []
    for m in range(len(ys)):
        channels = []
        for c in range(ys[m].shape[1]):
            if norm.weight[m, c].abs() < norm.threshold:
                others = [ys[j][:, c] for j in range(len(ys)) if j != m]
                channels.append(sum(others) / len(others))
            else:
                channels.append(ys[m][:, c])
        outs.append(torch.stack(channels, dim=1))
    return outs


def loop_forward(model: CENUNet, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The CEN U-Net run modality by modality with the model's shared convs.

    Where norms and exchange sit is decided here from the spec (encoder blocks 2..N-1
    exchange, block 1 and N have no norm, decoder norms everywhere but the last block), not
    read from the model, so a misplaced exchange point fails the comparison.
    """
    n = model.config.num_downs
    xs = list(inputs)
    skips = []
    for i, block in enumerate(model.down):
        if i > 0:
            xs = [F.leaky_relu(x, 0.2) for x in xs]
        xs = [block.conv(x) for x in xs]
        if 0 < i < n - 1:
            xs = loop_norm(block.norm, xs, exchange=True)
        skips.append(xs)
    skips.pop()
    for j, block in enumerate(model.up):
        xs = [block.conv(F.relu(x)) for x in xs]
        if j < n - 1:
            xs = loop_norm(block.norm, xs, exchange=False)
            skip = skips.pop()
            xs = [torch.cat([x, s], dim=1) for s, x in zip(skip, xs)]
        else:
            xs = [torch.tanh(x) for x in xs]
    weights = torch.softmax(model.ensemble.alpha, dim=0)
    ensemble = sum(weights[m] * x.detach() for m, x in enumerate(xs))
    return [*xs, ensemble]


def randomise(model: nn.Module, seed: int = 0) -> None:
    """Random gammas/betas in every norm, about 30 % of exchanging gammas below threshold."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, ModalityInstanceNorm2d):
                module.weight.uniform_(0.5, 1.5, generator=g)
                module.bias.normal_(0, 0.2, generator=g)
                if module.exchange:
                    low = torch.rand(module.weight.shape, generator=g) < 0.3
                    module.weight[low] = -3e-3
        model.ensemble.alpha.normal_(0, 1, generator=g)


def assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.detach().abs().max()) + 1e-7)


@pytest.mark.parametrize("num_modalities", [2, 3])
def test_unet_matches_per_modality_loop(num_modalities: int) -> None:
    torch.manual_seed(0)
    # float64: conv biases in front of an InstanceNorm have an exact zero gradient, which
    # float32 reaches only up to rounding that depends on the order of summation.
    model = create_cen_unet(
        num_modalities=num_modalities, ngf=4, num_downs=5, drop_rate=0.0
    ).double()
    randomise(model)
    assert sum(int(n.exchange_mask().sum()) for _, n in exchanging_norms(model)) > 0
    ref = copy.deepcopy(model)
    inputs = [torch.randn(2, 3, 32, 32, dtype=torch.float64) for _ in range(num_modalities)]
    ref_inputs = [x.clone().requires_grad_(True) for x in inputs]
    inputs = [x.requires_grad_(True) for x in inputs]

    out = model(inputs)
    ref_out = loop_forward(ref, ref_inputs)
    assert out.shape == (num_modalities + 1, 2, 3, 32, 32)
    for a, b in zip(out.unbind(0), ref_out):
        assert_close(a, b)

    weights = torch.randn(out.shape, dtype=torch.float64)
    loss = (out * weights).sum() + sparsity_penalty(model, 0.1)
    ref_loss = sum((o * w).sum() for o, w in zip(ref_out, weights)) + sparsity_penalty(ref, 0.1)
    loss.backward()
    ref_loss.backward()
    for x, x_ref in zip(inputs, ref_inputs):
        assert_close(x.grad, x_ref.grad)
    # Exact zeros (those biases) are compared on the scale of the largest gradient.
    params = dict(model.named_parameters())
    scale = max(float(p.grad.abs().max()) for p in ref.parameters())
    for name, param in ref.named_parameters():
        assert params[name].grad is not None, name
        torch.testing.assert_close(params[name].grad, param.grad, rtol=1e-5, atol=1e-6 * scale)


def test_exchange_points_and_widths_of_unet256() -> None:
    model = create_cen_unet()
    points = exchanging_norms(model)
    assert [name for name, _ in points] == [f"down.{i}.norm" for i in range(1, 7)]
    assert [n.num_features for _, n in points] == [128, 256, 512, 512, 512, 512]
    assert all(n.threshold == 1e-2 and n.num_modalities == 2 for _, n in points)
    assert [b.conv.out_channels for b in model.down] == [64, 128, 256, 512, 512, 512, 512, 512]
    assert [b.conv.out_channels for b in model.up] == [512, 512, 512, 512, 256, 128, 64, 3]
    decoder_norms = [b.norm for b in model.up if isinstance(b.norm, ModalityInstanceNorm2d)]
    assert len(decoder_norms) == 7 and not any(n.exchange for n in decoder_norms)
    dropouts = [isinstance(b.drop, nn.Dropout) for b in model.up]
    assert dropouts == [True] * 3 + [False] * 5
    assert isinstance(model.down[0].act, nn.Identity)
    assert isinstance(model.down[0].norm, nn.Identity)
    assert isinstance(model.down[7].norm, nn.Identity)
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    weights = torch.cat([c.weight.flatten() for c in convs])
    assert abs(float(weights.detach().std()) - 0.02) < 1e-3 and all(not c.bias.any() for c in convs)


def test_dropout_scales_with_depth() -> None:
    assert [default_num_dropout(n) for n in (4, 5, 6, 7, 8, 9)] == [0, 0, 1, 2, 3, 3]
    model = create_cen_unet(num_downs=6, ngf=4)
    assert [isinstance(b.drop, nn.Dropout) for b in model.up] == [True] + [False] * 5
    model = create_cen_unet(num_downs=6, ngf=4, num_dropout=2, drop_rate=0.3)
    assert [b.drop.p for b in model.up[:2]] == [0.3, 0.3]


def test_shapes_list_and_stacked_input() -> None:
    torch.manual_seed(0)
    model = create_cen_unet(num_modalities=3, ngf=4, num_downs=4, out_channels=1).eval()
    inputs = [torch.randn(2, 3, 32, 48) for _ in range(3)]
    with torch.no_grad():
        out = model(inputs)
        stacked = model(torch.cat(inputs))
    assert out.shape == (4, 2, 1, 32, 48)
    assert torch.equal(out, stacked)
    assert float(out.abs().max()) <= 1.0
    with pytest.raises(ValueError, match="multiples"):
        model(torch.randn(3, 3, 24, 32))
    with pytest.raises(ValueError, match="modalities"):
        model(inputs[:2])
    with pytest.raises(CenError, match="^num_modalities=1: expected an integer of at least 2"):
        create_cen_unet(num_modalities=1)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"num_modalities": "2"}, "num_modalities='2': expected an integer of at least 2"),
        ({"num_downs": 2.5}, "num_downs=2.5: expected an integer of at least 2"),
        ({"ngf": -8}, "ngf=-8: expected an integer of at least 1"),
        ({"ngf": 0}, "ngf=0: expected an integer of at least 1"),
        ({"in_channels": 0}, "in_channels=0: expected an integer of at least 1"),
        ({"num_dropout": 9, "num_downs": 5}, "num_dropout=9: expected 0..4"),
        ({"drop_rate": 2}, "drop_rate=2: expected a number in [0, 1)"),
        ({"drop_rate": -1}, "drop_rate=-1: expected a number in [0, 1)"),
        ({"threshold": "x"}, "threshold='x': expected a finite number >= 0"),
        ({"threshold": float("nan")}, "threshold=nan: expected a finite number >= 0"),
    ],
)
def test_bad_unet_arguments_are_one_line(arguments: dict, message: str) -> None:
    with pytest.raises(CenError) as info:
        create_cen_unet(**arguments)
    assert str(info.value) == message


def test_ensemble_loss_trains_only_alpha() -> None:
    model = create_cen_unet(ngf=4, num_downs=4)
    out = model([torch.randn(1, 3, 16, 16), torch.randn(1, 3, 16, 16)])
    out[-1].square().mean().backward()
    assert model.ensemble.alpha.grad is not None and model.ensemble.alpha.grad.abs().sum() > 0
    others = [p.grad for n, p in model.named_parameters() if n != "ensemble.alpha"]
    assert all(g is None or not g.any() for g in others)


def test_patchgan_map_for_256_input() -> None:
    disc = create_patchgan()
    with torch.no_grad():
        out = disc(torch.randn(1, 6, 256, 256))
    assert out.shape == (1, 1, 30, 30)
    # 4x4 convolutions with bias: 6->64, 64->128, 128->256, 256->512, 512->1; the released
    # affine InstanceNorms after the middle three: 2 * (128 + 256 + 512)
    convs = 6208 + 131_200 + 524_544 + 2_097_664 + 8193
    assert sum(p.numel() for p in disc.parameters()) == convs + 1792
    plain = create_patchgan(norm="instance")
    assert sum(p.numel() for p in plain.parameters()) == convs


def test_patchgan_receptive_field_is_70() -> None:
    disc = create_patchgan(ndf=4, norm="none")
    x = torch.randn(1, 6, 128, 128, requires_grad=True)
    out = disc(x)
    assert out.shape == (1, 1, 14, 14)
    out[0, 0, 7, 7].backward()
    seen = x.grad.abs().sum((0, 1)).nonzero()
    rows, cols = seen[:, 0], seen[:, 1]
    assert int(rows.max() - rows.min()) + 1 == 70
    assert int(cols.max() - cols.min()) + 1 == 70


def test_patchgan_judges_stacked_pairs_independently() -> None:
    disc = create_patchgan(ndf=4)
    pairs = torch.randn(3, 6, 64, 64)
    with torch.no_grad():
        together = disc(pairs)
        alone = torch.cat([disc(p[None]) for p in pairs])
    torch.testing.assert_close(together, alone)


def test_released_generator_size() -> None:
    """pix2pix U-Net-256 with two private IN sets: 54.43 M parameters, as released."""
    model = create_cen_unet()
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == 54.43
