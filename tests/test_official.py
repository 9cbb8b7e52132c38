import numpy as np
import pytest
import torch

import cenfusion
from cenfusion import CenError, create_cen_refinenet, load_official_checkpoint
from cenfusion.models.official import load_official_state_dict, to_official_state_dict


@pytest.fixture(scope="module")
def model_and_state():
    torch.manual_seed(0)
    model = create_cen_refinenet(depth=50, num_classes=9, num_modalities=3).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
        model.ensemble.alpha.copy_(torch.tensor([0.2, 1.0, -0.3]))
    return model, to_official_state_dict(model)


def test_released_key_layout(model_and_state) -> None:
    _, state = model_and_state
    expected = [
        "module.conv1.module.weight",
        "module.bn1.bn_2.running_var",
        "module.layer1.0.conv1.module.weight",
        "module.layer3.5.bn2.bn_1.weight",
        "module.layer1.0.downsample.0.module.weight",
        "module.layer1.0.downsample.1.bn_0.running_var",
        "module.layer4.2.bn3.bn_2.num_batches_tracked",
        "module.p_ims1d2_outl1_dimred.module.weight",
        "module.p_ims1d2_outl4_dimred.module.weight",
        "module.adapt_stage1_b.0.1_conv.module.weight",
        "module.adapt_stage1_b.0.1_conv.module.bias",
        "module.adapt_stage4_b.0.2_conv_relu_varout_dimred.module.weight",
        "module.adapt_stage2_b2_joint_varout_dimred.module.weight",
        "module.adapt_stage4_b2_joint_varout_dimred.module.weight",
        "module.mflow_conv_g1_pool.0.4_outvar_dimred.module.weight",
        "module.mflow_conv_g4_b.0.3_conv_relu_varout_dimred.module.weight",
        "module.mflow_conv_g1_b3_joint_varout_dimred.module.weight",
        "module.mflow_conv_g3_b3_joint_varout_dimred.module.weight",
        "module.clf_conv.module.bias",
        "module.alpha",
    ]
    for key in expected:
        assert key in state, key
    assert "module.adapt_stage1_b2_joint_varout_dimred.module.weight" not in state
    assert "module.mflow_conv_g4_b3_joint_varout_dimred.module.weight" not in state
    assert state["module.alpha"].shape == (3,)
    assert state["module.p_ims1d2_outl1_dimred.module.weight"].shape == (512, 2048, 3, 3)
    assert state["module.layer2.0.bn2.bn_0.weight"].shape == (128,)
    decoder = [k for k in state if not k.startswith(("module.layer", "module.conv1", "module.bn1"))]
    per_stage = [21, 22, 22, 21]  # reduce, 2+3 RCU units (w, b, w), CRP 4, fuse, project
    assert len(decoder) == sum(per_stage) + 2 + 1


def test_round_trip_gives_identical_outputs(model_and_state, tmp_path) -> None:
    model, state = model_and_state
    path = tmp_path / "cen.pth.tar"
    torch.save({"segmenter": state, "epoch": 3, "best_val": np.float64(0.5)}, path)
    loaded = load_official_checkpoint(path).eval()
    assert loaded.config.num_classes == 9 and loaded.config.num_modalities == 3
    assert loaded.config.backbone == "resnet50"
    inputs = [torch.randn(1, 3, 40, 56) for _ in range(3)]
    with torch.no_grad():
        for a, b in zip(model(inputs), loaded(inputs)):
            assert torch.equal(a, b)


def test_incomplete_or_extra_keys_are_named(model_and_state) -> None:
    _, state = model_and_state
    missing = dict(state)
    del missing["module.layer2.1.bn2.bn_2.running_mean"]
    with pytest.raises(CenError, match=r"layer2\.1\.bn2\.bn_2\.running_mean"):
        load_official_state_dict(missing)
    extra = dict(state)
    extra["module.layer2.1.bn2.bn_3.weight"] = torch.ones(128)
    with pytest.raises(CenError, match=r"layer2\.1\.bn2\.bn_3\.weight"):
        load_official_state_dict(extra)


def test_unreadable_checkpoint(tmp_path) -> None:
    with pytest.raises(CenError, match="not found"):
        load_official_checkpoint(tmp_path / "missing.pth.tar")
    bad = tmp_path / "bad.pth.tar"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CenError, match="not a readable"):
        load_official_checkpoint(bad)


def test_missing_parts_are_named_in_words(model_and_state) -> None:
    _, state = model_and_state
    three_blocks = {k: v for k, v in state.items() if not k.startswith("module.layer3.5.")}
    three_blocks = {k: v for k, v in three_blocks.items() if not k.startswith("module.layer3.4.")}
    three_blocks = {k: v for k, v in three_blocks.items() if not k.startswith("module.layer3.3.")}
    with pytest.raises(CenError, match=r"layer3 has 3 blocks, expected 6, 23 or 36"):
        load_official_state_dict(three_blocks)
    for key, words in (
        ("module.clf_conv.module.weight", "the classifier"),
        ("module.alpha", "ensemble weights"),
    ):
        lacking = {k: v for k, v in state.items() if k != key}
        with pytest.raises(CenError, match=words):
            load_official_state_dict(lacking)


def test_entries_that_are_not_named_tensors(model_and_state) -> None:
    _, state = model_and_state
    with pytest.raises(CenError, match="found int key 0"):
        load_official_state_dict({0: torch.ones(1), **state})
    with pytest.raises(
        CenError, match="'module.alpha' holds a value of type list, expected a tensor"
    ):
        load_official_state_dict({**state, "module.alpha": [1.0, 2.0]})


def test_cli_conversion_keeps_the_threshold_asked_for(model_and_state, tmp_path) -> None:
    from cenfusion.cli import main
    from cenfusion.segmentation.modelio import model_from_checkpoint

    _, state = model_and_state
    path = tmp_path / "cen.pth.tar"
    torch.save({"segmenter": state}, path)
    for extra, threshold in (([], 2e-2), (["--threshold", "0.05"], 0.05)):
        assert main(["convert-official", str(path), str(tmp_path / "o.pth"), *extra]) == 0
        assert model_from_checkpoint(tmp_path / "o.pth").config.bn_threshold == threshold


def test_a_models_own_state_dict_is_pointed_to_save_segmenter(model_and_state, tmp_path) -> None:
    """A researcher's ``torch.save(model.state_dict())`` is neither format: the refusal says
    what to do, and ``save_segmenter`` writes the file every reader takes."""
    model, _ = model_and_state
    torch.save(model.state_dict(), tmp_path / "sd.pth")
    with pytest.raises(CenError, match=r"the state dict of a cenfusion model, without its set"):
        cenfusion.load_segmenter(tmp_path / "sd.pth")
    torch.save({"state_dict": model.state_dict()}, tmp_path / "nested.pth")
    with pytest.raises(CenError, match=r"'segmenter' state dict, found keys state_dict\)$"):
        cenfusion.load_segmenter(tmp_path / "nested.pth")
    cenfusion.save_segmenter(model, tmp_path / "mine.pth")
    loaded = cenfusion.load_segmenter(tmp_path / "mine.pth").model.eval()
    x = [torch.randn(1, 3, 32, 40) for _ in range(3)]
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    with pytest.raises(CenError, match="^save_segmenter: expected a CENRefineNet, got Linear"):
        cenfusion.save_segmenter(torch.nn.Linear(2, 2), tmp_path / "x.pth")
