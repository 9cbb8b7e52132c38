"""``cen i2i predict``: translation checkpoints, ours and released, on one's own views."""

from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from PIL import Image
from released_files import released_layout

import cenfusion
from cenfusion.cli import main
from cenfusion.data.taskonomy import TaskonomyDataset
from cenfusion.engine.checkpoint import save_checkpoint
from cenfusion.engine.run import RuntimeConfig
from cenfusion.errors import CenError
from cenfusion.models.official_translation import generator_key_map
from cenfusion.models.unet import create_cen_unet
from cenfusion.translation import predict as predict_module
from cenfusion.translation.evaluate import Evaluator
from cenfusion.translation.predict import translate

CPU = RuntimeConfig(device="cpu")
SIDE = 64


def _generator(seed: int = 0):
    """A 6-level U-Net (one dropout block) with weights large enough to exchange channels."""
    torch.manual_seed(seed)
    generator = create_cen_unet(ngf=4, num_downs=6)
    with torch.no_grad():
        for p in generator.parameters():
            p.normal_(0, 0.2)
    return generator


def _save(path: Path, generator, eval_dropout: bool, img_types=(2, 7, 0), side: int = SIDE) -> Path:
    config = {"img_types": list(img_types), "crop_size": side, "eval_dropout": eval_dropout}
    save_checkpoint(
        path,
        {
            "task": "translation",
            "model_config": generator.config.to_dict(),
            "model": generator.state_dict(),
            "config": config,
        },
    )
    return path


@pytest.fixture(scope="module")
def generator():
    return _generator()


def _bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_predict_writes_what_evaluation_writes(i2i_data: Path, generator, tmp_path: Path) -> None:
    """The validation views of a Taskonomy root, predicted from their files, give the PNGs
    that evaluation writes for them (every head), one at a time and batched; the domain
    folders pair by view although their file names end in their domain."""
    checkpoint = _save(tmp_path / "g.pth", generator, eval_dropout=False)
    val = TaskonomyDataset(i2i_data, "val", ["reshading", "edge_texture"], "rgb", size=SIDE)
    loader = torch.utils.data.DataLoader(val, batch_size=2)
    evaluate = Evaluator(loader, torch.device("cpu"), None, nullcontext(), dropout=False)
    evaluate(generator, tmp_path / "eval")
    for batch_size in (1, 3):
        out = tmp_path / f"out{batch_size}"
        written = translate(
            checkpoint, [i2i_data], out, heads=True, batch_size=batch_size, runtime=CPU
        )
        assert sorted(written) == sorted(out.iterdir())
        assert len(written) == 3 * 6  # 4 train + 2 val views, ensemble and two branches
        predicted = _bytes(out)
        for k, suffix in enumerate(("_from_reshading", "_from_edge_texture", "")):
            for name, data in _bytes(tmp_path / "eval" / f"fake{k}").items():
                assert predicted[name.replace(".png", f"{suffix}.png")] == data, (k, name)


def test_inputs_are_fed_to_the_branches_they_were_trained_on(
    i2i_data: Path, generator, tmp_path: Path
) -> None:
    checkpoint = _save(tmp_path / "g.pth", generator, eval_dropout=False)
    shading, texture = i2i_data / "reshading", i2i_data / "edge_texture"
    translate(checkpoint, [(shading, texture)], tmp_path / "a", runtime=CPU)
    translate(checkpoint, [(texture, shading)], tmp_path / "b", domains=["7", "2"], runtime=CPU)
    assert _bytes(tmp_path / "a") == _bytes(tmp_path / "b")
    swapped = _save(tmp_path / "s.pth", generator, eval_dropout=False, img_types=(7, 2, 0))
    translate(swapped, [(texture, shading)], tmp_path / "c", runtime=CPU)
    assert _bytes(tmp_path / "c") != _bytes(tmp_path / "a")


def test_dropout_follows_the_run_and_the_seed_fixes_its_samples(
    i2i_data: Path, generator, tmp_path: Path
) -> None:
    sampling = _save(tmp_path / "d.pth", generator, eval_dropout=True)
    fixed = _save(tmp_path / "f.pth", generator, eval_dropout=False)
    run = {"inputs": [i2i_data], "runtime": CPU}
    outputs = {}
    for name, checkpoint, options in (
        ("default", sampling, {}),
        ("seed 0", sampling, {"dropout": True, "seed": 0}),
        ("again", sampling, {"dropout": True, "seed": 0}),
        ("seed 1", sampling, {"dropout": True, "seed": 1}),
        ("off", sampling, {"dropout": False}),
        ("run off", fixed, {}),
    ):
        translate(checkpoint, out=tmp_path / name, **run, **options)
        outputs[name] = _bytes(tmp_path / name)
    assert outputs["default"] == outputs["seed 0"] == outputs["again"]
    assert outputs["seed 1"] != outputs["seed 0"] != outputs["off"]
    assert outputs["off"] == outputs["run off"]


def test_a_released_generator_predicts_once_its_domains_are_named(
    i2i_data: Path, generator, tmp_path: Path
) -> None:
    released = tmp_path / "checkpoint-gen-300.pkl"
    torch.save(released_layout(generator, generator_key_map), released)
    ours = _save(tmp_path / "g.pth", generator, eval_dropout=False)
    assert cenfusion.load_generator(released).inputs is None
    loaded = cenfusion.load_generator(ours)
    assert (loaded.inputs, loaded.target, loaded.side) == (("reshading", "edge_texture"), "rgb", 64)
    items = [(i2i_data / "reshading", i2i_data / "edge_texture")]
    with pytest.raises(CenError, match="does not name its input domains: give each input as"):
        translate(released, items, tmp_path / "r", runtime=CPU)
    options = {"size": [SIDE], "dropout": False, "runtime": CPU}
    translate(released, items, tmp_path / "r", domains=["reshading", "edge_texture"], **options)
    translate(ours, items, tmp_path / "o", dropout=False, runtime=CPU)
    assert _bytes(tmp_path / "r") == _bytes(tmp_path / "o")
    assert Image.open(next((tmp_path / "r").iterdir())).size == (SIDE, SIDE)


def test_sizes_other_than_the_run_s(i2i_data: Path, generator, tmp_path: Path) -> None:
    checkpoint = _save(tmp_path / "g.pth", generator, eval_dropout=False)
    translate(checkpoint, [i2i_data], tmp_path / "o", size=(128, 64), runtime=CPU)
    assert {Image.open(p).size for p in (tmp_path / "o").iterdir()} == {(64, 128)}
    for size in ((96,), (64, 64, 64), (0, 64)):
        said = " ".join(map(str, size))
        with pytest.raises(CenError, match=f"^--size {said}: expected H W, multiples"):
            translate(checkpoint, [i2i_data], tmp_path / "x", size=size, runtime=CPU)
    _save(checkpoint, generator, eval_dropout=False, side=48)
    with pytest.raises(CenError, match="the default side 48 is not a multiple of 2..num_downs"):
        translate(checkpoint, [i2i_data], tmp_path / "x", runtime=CPU)
    assert not (tmp_path / "x").exists()


def test_refusals_come_before_anything_is_written(
    i2i_data: Path, generator, tmp_path: Path, capsys
) -> None:
    checkpoint = _save(tmp_path / "g.pth", generator, eval_dropout=False)
    out = tmp_path / "out"
    shading, texture = i2i_data / "reshading", i2i_data / "edge_texture"
    cases = [
        ({"domains": ["reshading", "normal"]}, "was trained on .reshading, edge_texture.; each"),
        ({"domains": ["reshading"]}, "the generator takes 2 inputs"),
        ({"domains": ["2", "reshading"]}, "expected distinct domains"),
        ({"domains": ["nowhere", "7"]}, "Taskonomy domain 'nowhere' is unknown"),
        ({"batch_size": 0}, "--batch-size 0: expected >= 1"),
    ]
    for options, message in cases:
        with pytest.raises(CenError, match=message):
            translate(checkpoint, [(shading, texture)], out, runtime=CPU, **options)
    broken = tmp_path / "broken"
    for domain, folder in (("reshading", shading), ("edge_texture", texture)):
        (broken / domain).mkdir(parents=True)
        for path in sorted(folder.iterdir())[:3]:
            (broken / domain / path.name).write_bytes(path.read_bytes())
    last = max((broken / "edge_texture").iterdir())
    last.write_bytes(b"not a png")
    with pytest.raises(CenError, match=f"cannot read image {last}"):
        translate(checkpoint, [broken], out, runtime=CPU)
    first = min((broken / "reshading").iterdir())
    first.write_bytes(b"not a png either")
    with pytest.raises(CenError, match=r"\(1 of 2 problems\)$"):  # each said, not the first
        translate(checkpoint, [broken], out, runtime=CPU)
    said = capsys.readouterr().err
    assert f"cannot read image {first}" in said and f"cannot read image {last}" in said
    for options, message in (
        ({"runtime": RuntimeConfig(device="cpu", threads=-3)}, "--threads -3: expected 1 to 1024"),
        ({"seed": 2**64}, f"--seed {2**64}: expected 0 to"),
    ):
        with pytest.raises(CenError, match=message):
            translate(checkpoint, [broken], out, **{"runtime": CPU, **options})
    segmenter = tmp_path / "seg.pth"
    save_checkpoint(segmenter, {"task": "segmentation", "model": {}})
    with pytest.raises(CenError, match="a segmentation checkpoint, expected translation"):
        translate(segmenter, [broken], out, runtime=CPU)
    junk = tmp_path / "junk.pkl"
    junk.write_bytes(b"junk")
    with pytest.raises(CenError, match="neither a cenfusion translation checkpoint nor a"):
        translate(junk, [broken], out, runtime=CPU)
    assert not out.exists()


def test_outputs_may_not_write_over_inputs_and_a_refused_run_leaves_no_folder(
    i2i_data: Path, generator, tmp_path: Path
) -> None:
    checkpoint = _save(tmp_path / "g.pth", generator, eval_dropout=False)
    own = tmp_path / "own"
    own.mkdir()
    for domain in ("reshading", "edge_texture"):
        view = i2i_data / domain / f"point_0_view_0_domain_{domain}.png"
        (own / f"{domain}.png").write_bytes(view.read_bytes())
    before = {p.name: p.read_bytes() for p in own.iterdir()}
    items = [(own / "reshading.png", own / "edge_texture.png")]
    with pytest.raises(CenError, match=r"^--out .*own: reshading.png there is an input, which"):
        translate(checkpoint, items, own, runtime=CPU)
    assert {p.name: p.read_bytes() for p in own.iterdir()} == before
    if not torch.cuda.is_available():
        with pytest.raises(CenError, match="cuda"):
            translate(checkpoint, items, tmp_path / "out", runtime=RuntimeConfig(device="cuda"))
        assert not (tmp_path / "out").exists()


def test_head_outputs_may_not_overwrite_a_sample_s(
    i2i_data: Path, generator, tmp_path: Path
) -> None:
    checkpoint = _save(tmp_path / "g.pth", generator, eval_dropout=False)
    files = [i2i_data / d / f"point_0_view_0_domain_{d}.png" for d in ("reshading", "edge_texture")]
    named = tmp_path / "point_0_view_0_from_reshading.png"
    named.write_bytes(files[0].read_bytes())
    items = [tuple(files), (named, files[1])]
    message = "^point_0_view_0_from_reshading.png: written by .* and by the from_reshading head"
    with pytest.raises(CenError, match=message):
        translate(checkpoint, items, tmp_path / "out", heads=True, runtime=CPU)
    assert len(translate(checkpoint, items, tmp_path / "out", runtime=CPU)) == 2


def test_dropout_s_seed_on_the_cpu_leaves_every_other_stream_as_it_was(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``torch.manual_seed`` would reseed every CUDA device too, and a CPU run restores
    only the CPU's stream: it seeds the CPU's alone."""
    seeded: list[int] = []
    monkeypatch.setattr(torch, "manual_seed", seeded.append)
    before = torch.get_rng_state()
    with predict_module._seeded(7, torch.device("cpu")):
        drawn = torch.rand(3)
    assert not seeded and torch.equal(torch.get_rng_state(), before)
    torch.default_generator.manual_seed(7)
    assert torch.equal(torch.rand(3), drawn)
    torch.set_rng_state(before)


def test_the_command(i2i_data: Path, generator, tmp_path: Path, capsys) -> None:
    checkpoint = str(_save(tmp_path / "g.pth", generator, eval_dropout=False))
    base = ["i2i", "predict", checkpoint, "--device", "cpu"]
    shading, texture = i2i_data / "reshading", i2i_data / "edge_texture"
    assert main([*base, str(i2i_data), "-o", str(tmp_path / "a"), "--heads"]) == 0
    assert "wrote 18 files to" in capsys.readouterr().out
    flags = ["--input", f"7={texture}", "--input", f"reshading={shading}", "--batch-size", "2"]
    assert main([*base, *flags, "-o", str(tmp_path / "b")]) == 0
    assert _bytes(tmp_path / "b") == {
        k: v for k, v in _bytes(tmp_path / "a").items() if "_from_" not in k
    }
    for extra, message in (
        ([str(i2i_data), "--input", f"7={texture}"], "give folders with one subfolder"),
        (["--input", str(texture)], "expected DOMAIN=PATH"),
        (["--input", f"7={texture}", "--input", f"7={texture}", "--input", f"2={shading}"],
         "each input needs as many paths as the others, got 7 2, 2 1"),
        ([], "nothing to translate"),
    ):  # fmt: skip
        assert main([*base, *extra, "-o", str(tmp_path / "c")]) == 2
        assert message in capsys.readouterr().err


def test_hidden_files_are_left_out_and_a_stem_that_is_only_a_domain_ending_is_kept(
    i2i_data: Path, generator, tmp_path: Path
) -> None:
    checkpoint = _save(tmp_path / "g.pth", generator, eval_dropout=False)
    root = tmp_path / "views"
    for domain in ("reshading", "edge_texture"):
        (root / domain).mkdir(parents=True)
        view = (i2i_data / domain / f"point_0_view_0_domain_{domain}.png").read_bytes()
        (root / domain / f"point_0_view_0_domain_{domain}.png").write_bytes(view)
        (root / domain / "._point_0_view_0.png").write_bytes(b"resource fork")
    translate(checkpoint, [root], tmp_path / "a", runtime=CPU)
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["point_0_view_0.png"]
    for domain in ("reshading", "edge_texture"):
        (root / domain / f"point_0_view_0_domain_{domain}.png").rename(
            root / domain / f"_domain_{domain}.png"
        )
    with pytest.raises(CenError, match="_domain_edge_texture.png has no reshading partner"):
        translate(checkpoint, [root], tmp_path / "b", runtime=CPU)
