import fnmatch
import json
import logging
from dataclasses import replace
from functools import partial
from pathlib import Path

import pytest
import timm
import torch

from cenfusion.cli import main
from cenfusion.engine.checkpoint import load_checkpoint, save_checkpoint, saved_config
from cenfusion.engine.launch import free_port, rank_env
from cenfusion.engine.run import EPOCH_RECORD
from cenfusion.engine.run import log as run_log
from cenfusion.engine.session import evaluate
from cenfusion.engine.session import train as train_task
from cenfusion.errors import CenError
from cenfusion.fusion import exchanging_norms
from cenfusion.metrics.segmentation import scores_from_confusion
from cenfusion.reporting.runlog import load_confusion
from cenfusion.segmentation import train as train_module
from cenfusion.segmentation.build import build_dataset
from cenfusion.segmentation.config import SYNTHETIC, SegmentationConfig
from cenfusion.segmentation.demo import DemoRow, demo_findings, run_demo
from cenfusion.segmentation.evaluate import evaluate_protocols, run_evaluation
from cenfusion.segmentation.modelio import model_from_checkpoint, model_record
from cenfusion.segmentation.task import SEGMENTATION
from cenfusion.segmentation.train import SegmentationRecipe


def train(cfg: SegmentationConfig, resume: Path | None = None, force: bool = False):
    return train_task(SEGMENTATION, cfg, resume, force)


def resolved(checkpoint: Path) -> SegmentationConfig:
    """The settings a command continuing ``checkpoint`` with no flags runs with."""
    return SEGMENTATION.resolve_config(None, None, {}, saved_config(checkpoint, "segmentation"))


@pytest.fixture(scope="module")
def data_root(seg_data: Path) -> Path:
    return seg_data


def tiny(data_root: Path, runs: Path, **changes) -> SegmentationConfig:
    cfg = replace(
        SYNTHETIC,
        data=data_root,
        runs=runs,
        backbone="resnet26",
        decoder_width=16,
        crop_size=32,
        min_short_side=32,
        batch_size=2,
        workers=0,
        epochs=(2, 1),
        lr_enc=(0.02, 0.01),
        lr_dec=(0.02, 0.01),
        val_every=1,
        device="cpu",
        max_iters=2,
        plots=False,
    )
    return replace(cfg, **changes)


def read_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_tiny_run_lowers_loss_and_writes_run_folder(data_root, tmp_path) -> None:
    cfg = tiny(
        data_root,
        tmp_path,
        epochs=(6,),
        lr_enc=(0.01,),
        lr_dec=(0.01,),
        val_every=3,
        scale_range=(1.0, 1.0),
        drop_rate=0.0,
        max_iters=3,
        plots=True,
    )
    records: list[dict] = []

    class Listener(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if hasattr(record, EPOCH_RECORD):
                records.append(getattr(record, EPOCH_RECORD))

    listener = Listener()
    run_log.addHandler(listener)
    try:
        progress = train(cfg)
    finally:
        run_log.removeHandler(listener)
    run_dir = tmp_path / cfg.exp
    assert {"config.yaml", "last.pth", "best.pth", "metrics.jsonl"} <= {
        p.name for p in run_dir.iterdir()
    }
    log = read_log(run_dir)
    assert [r["epoch"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in records] == [r["loss"] for r in log]  # what progress displays see
    assert log[-1]["loss"] < log[0]["loss"]
    assert "val" in log[2] and "val" not in log[1]
    assert set(log[2]["val"]) == {"rgb", "depth", "ensemble"}
    assert 0.0 <= log[-1]["exchange"]["overall"] <= 1.0
    assert all(0 < r["first_step_seconds"] <= r["seconds"] for r in log)
    assert "first step " in (run_dir / "log.txt").read_text()
    assert {p.name for p in (run_dir / "plots").iterdir()} >= {"losses.png", "scores.png"}
    best = load_checkpoint(run_dir / "best.pth", task="segmentation")
    assert best["best"]["score"] == progress.score
    assert best["best"]["score"] == max(r["val"]["ensemble"]["miou"] for r in log if "val" in r)
    saved = resolved(run_dir / "last.pth")
    assert saved == cfg
    assert SegmentationConfig.from_yaml(run_dir / "config.yaml") == cfg


def test_another_family_trains_with_its_own_exchange_points(data_root, tmp_path) -> None:
    pattern = "blocks.*.*.bn2"
    cfg = tiny(data_root, tmp_path, backbone="mobilenetv3_small_100", pretrained=None,
               exchange_at=(pattern,), epochs=(1,), lr_enc=(0.01,), lr_dec=(0.01,))  # fmt: skip
    train(cfg)
    (record,) = read_log(tmp_path / cfg.exp)
    encoder = timm.create_model(cfg.backbone, features_only=True)
    names = [n for n, m in encoder.named_modules() if fnmatch.fnmatchcase(n, pattern)]
    # timm's BatchNormAct2d becomes (private norm, drop, activation): the norm is its ".0"
    assert list(record["exchange"]["points"]) == [f"encoder.{n}" for n in names]
    assert len(names) >= 8


@pytest.mark.parametrize("interrupt_at", [1, 2])
def test_resume_gives_the_same_weights(data_root, tmp_path, monkeypatch, interrupt_at) -> None:
    full = train(tiny(data_root, tmp_path / "full"))
    expected = load_checkpoint(tmp_path / "full" / "cen" / "last.pth")

    real_begin = SegmentationRecipe.begin_epoch

    def stop_after(self, epoch):
        if epoch > interrupt_at:
            raise KeyboardInterrupt
        return real_begin(self, epoch)

    cfg = tiny(data_root, tmp_path / "cut")
    monkeypatch.setattr(SegmentationRecipe, "begin_epoch", stop_after)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.setattr(SegmentationRecipe, "begin_epoch", real_begin)
    last = tmp_path / "cut" / "cen" / "last.pth"
    stopped = load_checkpoint(last)
    assert (stopped["stage"], stopped["epoch"]) == (0, interrupt_at)
    said = f"interrupted in epoch {interrupt_at + 1} of 3; last.pth holds epoch {interrupt_at}"
    assert f"{said}, --resume continues" in (last.parent / "log.txt").read_text()

    resumed = train(resolved(last), resume=last)
    got = load_checkpoint(last)
    assert resumed.score == full.score
    for key, value in expected["model"].items():
        assert torch.equal(value, got["model"][key]), key
    assert len(read_log(tmp_path / "cut" / "cen")) == 3


def test_training_goes_on_alike_whichever_epochs_validate(data_root, tmp_path) -> None:
    """A validation draws from the random streams (its loader's seed): training must not
    see it, or a finished run extended would not repeat the longer schedule run at once."""
    weights = []
    for every, validated in ((1, [True, True, True]), (2, [False, True, True])):
        one_stage = {"epochs": (3,), "lr_enc": (0.02,), "lr_dec": (0.02,)}
        train(tiny(data_root, tmp_path / str(every), val_every=every, **one_stage))
        assert ["val" in line for line in read_log(tmp_path / str(every) / "cen")] == validated
        weights.append(load_checkpoint(tmp_path / str(every) / "cen" / "last.pth")["model"])
    for key, value in weights[0].items():
        assert torch.equal(value, weights[1][key]), key


def test_a_taken_run_folder_is_refused_before_data_and_model_are_built(data_root, tmp_path) -> None:
    cfg = tiny(data_root, tmp_path)
    cfg.run_dir.mkdir(parents=True)
    (cfg.run_dir / "last.pth").write_bytes(b"a run's checkpoint")

    def build_recipe(*args) -> None:
        raise AssertionError("built before the run folder was checked")

    task = replace(SEGMENTATION, build_recipe=build_recipe)
    with pytest.raises(CenError, match="already holds a run"):
        train_task(task, cfg)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(data_root, tmp_path, monkeypatch) -> None:
    real_loss = train_module.segmentation_loss
    calls = {"n": 0}

    def poisoned(heads, target):
        calls["n"] += 1
        loss = real_loss(heads, target)
        return loss * float("nan") if calls["n"] > 2 else loss

    monkeypatch.setattr(train_module, "segmentation_loss", poisoned)
    with pytest.raises(CenError, match=r"epoch 2, iteration 1: loss nan; stopping"):
        train(tiny(data_root, tmp_path))
    last = load_checkpoint(tmp_path / "cen" / "last.pth")
    assert (last["stage"], last["epoch"]) == (0, 1)
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


def test_evaluate_only_with_images(data_root, tmp_path) -> None:
    cfg = tiny(data_root, tmp_path, epochs=(1,), lr_enc=(0.01,), lr_dec=(0.01,))
    train(cfg)
    ckpt = tmp_path / "cen" / "best.pth"
    evaluated = evaluate(
        SEGMENTATION, replace(cfg, exp="eval", train_list="absent.txt"), ckpt, save_img=True
    )
    best = load_checkpoint(ckpt)
    assert evaluated["ensemble"]["miou"] == best["best"]["metrics"]["ensemble"]["miou"]
    images = sorted((tmp_path / "eval" / "images").iterdir())
    assert len(images) == 3
    assert (tmp_path / "eval" / "config.yaml").is_file()
    # --evaluate alone: the run's best checkpoint, with the settings saved in it
    trained = (tmp_path / "cen" / "config.yaml").read_bytes()
    assert main(["seg", "train", "--runs", str(tmp_path), "-c", "cen", "--evaluate"]) == 0
    line = json.loads((tmp_path / "cen" / "metrics.jsonl").read_text().splitlines()[-1])
    assert line["evaluate"] == str(ckpt) and line["epoch"] == 1
    assert line["val"]["ensemble"]["miou"] == evaluated["ensemble"]["miou"]
    # other settings for the evaluation: the run keeps its own config.yaml
    argv = ["seg", "train", "--runs", str(tmp_path), "-c", "cen", "--evaluate"]
    assert main([*argv, "--val-list", "train.txt"]) == 0
    assert (tmp_path / "cen" / "config.yaml").read_bytes() == trained


def test_a_one_modality_run_resumes_and_evaluates_with_its_own_settings(
    data_root, tmp_path
) -> None:
    """One modality has nothing to exchange: its run's saved ``exchange: true`` (the
    default) describes its model, which has no exchange points."""
    cfg = tiny(data_root, tmp_path, modalities=("depth",), epochs=(1,), lr_enc=(0.01,))
    train(replace(cfg, lr_dec=(0.01,)))
    assert cfg.exchange
    ckpt = tmp_path / "cen" / "last.pth"
    assert main(["seg", "train", "--runs", str(tmp_path), "-c", "cen", "--evaluate"]) == 0
    argv = ["seg", "train", "--runs", str(tmp_path), "-c", "cen", "--resume", "--epochs", "2"]
    assert main(argv) == 0
    assert load_checkpoint(ckpt)["epoch"] == 2
    assert load_checkpoint(ckpt)["data"] == {"depth_bits": {"depth": 16}}


def test_checkpoint_of_another_model_is_refused(data_root, tmp_path, capsys) -> None:
    cfg = tiny(data_root, tmp_path, epochs=(1,), lr_enc=(0.01,), lr_dec=(0.01,))
    train(cfg)
    ckpt = tmp_path / "cen" / "last.pth"
    with pytest.raises(CenError, match="model has 2 modalities, --modalities gives 1"):
        evaluate(SEGMENTATION, replace(cfg, modalities=("rgb",)), ckpt)
    classes = cfg.num_classes
    with pytest.raises(
        CenError, match=f"model has {classes} classes, --num-classes gives {classes + 1}"
    ):
        evaluate(SEGMENTATION, replace(cfg, num_classes=classes + 1), ckpt)
    for changes, message in (
        ({"backbone": "resnet50"}, "--backbone resnet50: the model of .* has resnet26;"),
        ({"decoder_width": 8}, "--decoder-width 8: the model of .* has 16;"),
        ({"threshold": 0.1}, "--threshold 0.1: the model of .* has 0.02;"),
        ({"exchange": False}, "--exchange False: the model of .* has exchange points;"),
        (
            {"exchange_at": ("layer*.*.bn1",)},
            r"--exchange-at layer\*\.\*\.bn1: the model of .* has exchange points layer\*",
        ),
    ):
        with pytest.raises(CenError, match=message + ".* a resumed run keeps its model"):
            train(replace(cfg, exp="more", epochs=(2,), **changes), resume=ckpt)
        with pytest.raises(CenError, match=message + ".* an evaluation scores the checkpoint's"):
            evaluate(SEGMENTATION, replace(cfg, exp="more", **changes), ckpt)
    assert not (tmp_path / "more").exists()
    bare = tmp_path / "bare.pth"  # weights alone, as a converted released file holds
    save_checkpoint(bare, model_record(model_from_checkpoint(ckpt)))
    evaluate(SEGMENTATION, replace(cfg, exp="bare", decoder_width=8), bare)  # a preset's width
    with pytest.raises(CenError, match=r"^--force: not with --resume .*last.pth, which continues"):
        train(replace(cfg, epochs=(2,)), resume=ckpt, force=True)
    swapped = replace(cfg, exp="more", modalities=tuple(reversed(cfg.modalities)))
    assert swapped.modalities == ("depth", "rgb")
    # each modality keeps its place and its kind, on resume and in scoring
    regray = replace(cfg, exp="more", modalities=("rgb:0:rgb", "depth:2:gray"))
    for wrong, refusal in (
        (
            swapped,
            r"^--modalities depth rgb: the model of .* was trained on rgb, depth, in this order",
        ),
        (
            regray,
            r"^--modalities rgb:0:rgb depth:2:gray: the model of .* on depth as depth, not gray",
        ),
    ):
        for call in (
            partial(train, replace(wrong, epochs=(2,)), resume=ckpt),
            partial(evaluate, SEGMENTATION, wrong, ckpt),
            partial(evaluate_protocols, wrong, ckpt),
        ):
            with pytest.raises(CenError, match=refusal):
                call()
    renamed = replace(swapped, modalities=("rgb:0:rgb", "d:2:depth"))
    with pytest.raises(CenError, match="^--modalities rgb:0:rgb d:2:depth: the model of .* rgb, d"):
        train(replace(renamed, epochs=(2,)), resume=ckpt)
    assert not (tmp_path / "more").exists()
    capsys.readouterr()
    evaluate(SEGMENTATION, renamed, ckpt)
    assert "warning: --modalities rgb:0:rgb d:2:depth: the model of " in capsys.readouterr().out
    # on resume, depth keeps its scale; scoring other data may change it
    with pytest.raises(
        CenError, match=r"^--depth-scale 0.001: the model of .* trained with 0.0002;"
    ):
        train(replace(cfg, exp="more", epochs=(2,), depth_scale=1e-3), resume=ckpt)
    capsys.readouterr()
    evaluate(SEGMENTATION, replace(cfg, exp="more", depth_scale=1e-3), ckpt)
    said = "warning: --depth-scale 0.001: the model of "
    assert said in capsys.readouterr().out
    # saved before exchange points were checked: points its encoder lacks, which never exchanged
    state = load_checkpoint(ckpt)
    state["model_config"]["exchange_at"] = ["blocks.*.*.bn2"]
    torch.save(state, tmp_path / "unchecked.pth")
    rebuilt = model_from_checkpoint(tmp_path / "unchecked.pth")
    assert rebuilt.config.exchange_at == () and not exchanging_norms(rebuilt)


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err


def test_cli_bad_input_gives_one_line(data_root, tmp_path, capsys) -> None:
    common = ["seg", "train", "--runs", str(tmp_path), "--device", "cpu", "--workers", "0"]
    code, err = run_cli([*common, "--data", str(tmp_path / "nowhere")], capsys)
    assert code == 2 and err.count("\n") == 1 and "nowhere" in err
    code, err = run_cli([*common, "--resume", str(tmp_path / "gone.pt"), "--evaluate"], capsys)
    assert code == 2 and err.count("\n") == 1 and "gone.pt" in err
    code, err = run_cli(
        [
            *common,
            "--data",
            str(data_root),
            "--preset",
            "synthetic",
            "--num-classes",
            "3",
            "--max-iters",
            "1",
            "--workers",
            "1",
            "--num-epoch",
            "1",
            "--lr-enc",
            "0.1",
            "--lr-dec",
            "0.1",
            "--backbone",
            "resnet26",
            "--crop-size",
            "32",
            "--batch-size",
            "2",
        ],
        capsys,
    )
    assert code == 2 and err.count("\n") == 1
    assert "expected 0..2 or 255" in err and err.startswith("cen: error: ")
    assert "train.txt:1: mask masks/000000.png has label" in err
    code, err = run_cli([*common, "--num-epoch", "1", "2", "3"], capsys)
    assert code == 2 and "one value per stage" in err


def test_demo_code_path_at_tiny_size(data_root, tmp_path, capsys) -> None:
    cfg = tiny(data_root, tmp_path, epochs=(1,), lr_enc=(0.01,), lr_dec=(0.01,))
    rows = run_demo(cfg, report=False, processes=2)
    labels = ["RGB only", "depth only", "CEN without exchange", "CEN"]
    assert [r.label for r in rows] == labels
    assert rows[0].exchanged is None and rows[2].exchanged is None
    assert rows[3].exchanged is not None and 0 <= rows[3].exchanged <= 1
    assert len(rows[3].exchanged_by_layer) == 8 and not rows[2].exchanged_by_layer
    assert [sorted(r.branch_miou) for r in rows] == [["rgb"], ["depth"], *[["depth", "rgb"]] * 2]
    assert rows[0].branch_miou["rgb"] == rows[0].miou
    out = capsys.readouterr().out
    assert all(f"| {label} |" in out for label in labels)
    assert all(f"{label}: mIoU {row.miou:.2f}" in out for label, row in zip(labels, rows))
    assert "heads' mIoU rgb / depth" in out and "CEN without exchange is " in out
    assert f"| {rows[1].interaction_miou:.2f} | - / {rows[1].branch_miou['depth']:.2f} |" in out
    assert "config (SegmentationConfig)" not in out  # the full config is in each log.txt
    assert "config (SegmentationConfig)" in (tmp_path / "demo-cen" / "log.txt").read_text()
    no_exchange = load_checkpoint(tmp_path / "demo-cen-no-exchange" / "best.pth")
    assert not no_exchange["model_config"]["exchange_at"]
    assert no_exchange["config"]["lamda"] == 0.0
    assert load_checkpoint(tmp_path / "demo-cen" / "best.pth")["config"]["threads"] == 1


def test_demo_reports_a_failed_run_in_one_line(data_root, tmp_path) -> None:
    """A run's error in its process ends the demo with that error, naming the run."""
    cfg = tiny(tmp_path / "missing", tmp_path / "runs")
    with pytest.raises(CenError, match=r"^demo (cen|cen-no-exchange): .*missing") as excinfo:
        run_demo(cfg, report=False, processes=2)
    assert "\n" not in str(excinfo.value)
    assert not (tmp_path / "runs").exists()
    (tmp_path / "afile").write_text("")
    unusable = tiny(data_root, tmp_path / "afile")
    with pytest.raises(CenError, match=r"^--runs .*afile: a file, expected the folder of runs$"):
        run_demo(unusable, report=False, processes=2)
    for changes, refusal in (
        ({"seed": -1}, "--seed -1: expected"),
        ({"epochs": (-1, 5)}, "--epochs -1 5: epochs must be >= 0"),
    ):
        with pytest.raises(CenError, match=f"^{refusal}"):
            run_demo(tiny(data_root, tmp_path / "runs", **changes), report=False, processes=2)
    assert not (tmp_path / "runs").exists()


def test_demo_findings_explain_a_gain_only_where_the_table_shows_one() -> None:
    def row(label: str, miou: float) -> DemoRow:
        return DemoRow(label, 50.0, 30.0, miou, 10.0, {}, None, {}, 1.0, None)

    def findings(late: float) -> str:
        labels = ("RGB only", "depth only", "CEN without exchange", "CEN")
        return demo_findings([row(n, m) for n, m in zip(labels, (20.0, 15.0, late, 30.0))])

    gain, loss = findings(25.0), findings(12.0)
    assert gain.startswith("CEN without exchange is 5.00 mIoU points above RGB only")
    assert "alone cannot see" in gain
    assert loss.startswith(
        "CEN without exchange is 8.00 mIoU points below RGB only, the better single modality. "
    )
    assert "cannot see" not in loss


def test_demo_plan_balances_modalities_over_processes() -> None:
    from cenfusion.segmentation.demo import RUNS, plan

    configs = {run.name: replace(SYNTHETIC, **run.changes) for run in RUNS}
    chains = plan(RUNS, configs, 2)
    assert [[run.name for run, _ in chain] for chain in chains] == [
        ["cen-no-exchange", "rgb-only"],
        ["cen", "depth-only"],
    ]
    assert [len(c) for c in plan(RUNS, configs, 8)] == [1, 1, 1, 1]
    assert [run.name for run, _ in plan(RUNS, configs, 1)[0]][:2] == ["cen-no-exchange", "cen"]


def test_the_demo_network_is_the_registry_cen_refinenet_at_a_quarter_width() -> None:
    from cenfusion.models.registry import create_model
    from cenfusion.segmentation.build import build_model

    model = build_model(SYNTHETIC)
    assert SYNTHETIC.model_name == "cen_refinenet" and SYNTHETIC.backbone == "resnet26_narrow"
    assert model.encoder.feature_info.channels() == [64, 128, 256, 512]
    names = [n for n, _ in model.named_modules() if n.endswith(".bn2")]
    assert len(names) == 8 and set(model.config.exchange_at) == {"layer*.*.bn2"}
    modules = dict(model.named_modules())
    bn2 = torch.cat([modules[n].weight.detach().flatten() for n in names])
    assert 0 <= bn2.min() and bn2.max() < 1 and bn2.std() > 0.2  # spread, not all at 1
    bn3 = [m.weight for n, m in modules.items() if n.endswith(".bn3")]
    assert len(bn3) == 8 and all(bool((w == 1).all()) for w in bn3)  # branches start open
    same = create_model("cen_refinenet", backbone="resnet26_narrow", num_classes=10)
    assert [p.shape for p in same.encoder.parameters()] == [
        p.shape for p in model.encoder.parameters()
    ]


def _ddp_rank(rank: int, port: int, cfg: SegmentationConfig, out: str) -> None:
    """One rank of the DDP test: train, and save what it saw and its parameters before and
    after training."""
    import os

    import torch.distributed as dist

    import cenfusion.segmentation.train as train_module

    os.environ.update(rank_env(rank, 2, port))
    torch.set_num_threads(1)
    masks: list[float] = []
    params: dict[str, dict[str, torch.Tensor]] = {}
    import cenfusion.engine.session as engine

    step, fit = train_module.SegmentationRecipe.train_step, engine.fit

    def recording_step(recipe: train_module.SegmentationRecipe, batch: dict) -> dict:
        masks.append(float(batch["mask"].double().sum()))
        losses = step(recipe, batch)
        params.setdefault("losses", []).append(float(losses["loss"]))
        return losses

    def named(recipe: train_module.SegmentationRecipe) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in recipe.net.named_parameters()}

    def recording_fit(recipe: train_module.SegmentationRecipe, *args, **kwargs) -> object:
        params["before"] = named(recipe)
        best = fit(recipe, *args, **kwargs)
        params["after"] = named(recipe)
        return best

    train_module.SegmentationRecipe.train_step = recording_step
    engine.fit = recording_fit
    try:
        progress = train(cfg)
        record = {"best": progress.score, "masks": masks, **params}
        torch.save(record, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_training_on_cpu_with_gloo(data_root, tmp_path) -> None:
    """Two ranks see different halves of the data and end with the same parameters, which
    training moved."""
    import torch.multiprocessing as mp

    port = free_port()
    cfg = tiny(data_root, tmp_path, epochs=(1,), lr_enc=(0.01,), lr_dec=(0.01,))
    mp.spawn(_ddp_rank, args=(port, cfg, str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["best"] == ranks[1]["best"]
    assert len(ranks[0]["masks"]) == len(ranks[1]["masks"]) >= 1
    assert ranks[0]["masks"] != ranks[1]["masks"], "each rank sees its own part of the data"
    after = [r["after"] for r in ranks]
    assert after[0].keys() == after[1].keys() and len(after[0]) > 100
    for name, value in after[0].items():
        assert torch.equal(value, after[1][name]), name
    moved = [n for n, v in after[0].items() if not torch.equal(v, ranks[0]["before"][n])]
    assert len(moved) > len(after[0]) // 2
    log = read_log(tmp_path / "cen")
    assert len(log) == 1 and set(log[0]["val"]) == {"rgb", "depth", "ensemble"}
    for head, matrix in load_confusion(tmp_path / "cen").items():
        saved = scores_from_confusion(torch.from_numpy(matrix))
        assert json.dumps(saved) == json.dumps(log[0]["val"][head]), "both ranks' pixels"
    every_step = ranks[0]["losses"] + ranks[1]["losses"]
    assert log[0]["loss"] == pytest.approx(sum(every_step) / len(every_step))
    assert ranks[0]["losses"] != ranks[1]["losses"]
    assert load_checkpoint(tmp_path / "cen" / "last.pth")["epoch"] == 1
    val_samples = len(build_dataset(cfg, train=False))
    start = (tmp_path / "cen" / "log.txt").read_text()
    assert f"/ {val_samples} val samples" in start and "2 processes" in start


def test_another_runs_checkpoint_may_not_write_over_a_run(data_root, tmp_path) -> None:
    """Continuing (or scoring) run A's checkpoint in run B's folder would replace B's
    checkpoints, or mix A's results into B's log: refused, B kept as it was."""
    one = {"epochs": (1,), "lr_enc": (0.01,), "lr_dec": (0.01,)}
    a, b = (tiny(data_root, tmp_path, exp=exp, **one) for exp in ("a", "b"))
    train(a)
    train(b)
    kept = {p.name: p.read_bytes() for p in b.run_dir.iterdir() if p.is_file()}
    foreign = r"^--resume .*a/last.pth: another run's checkpoint, and .*b holds a run of its own"
    with pytest.raises(CenError, match=foreign):
        train(replace(b, epochs=(2,)), resume=a.run_dir / "last.pth")
    with pytest.raises(CenError, match=foreign):
        evaluate(SEGMENTATION, b, a.run_dir / "last.pth")
    assert {p.name: p.read_bytes() for p in b.run_dir.iterdir() if p.is_file()} == kept
    evaluate(SEGMENTATION, b, b.run_dir / "last.pth")  # its own, as ever
    evaluate(SEGMENTATION, replace(b, exp="a-scored"), a.run_dir / "last.pth")


def test_a_run_another_process_writes_is_refused(data_root, tmp_path) -> None:
    import subprocess
    import sys

    cfg = tiny(data_root, tmp_path, epochs=(1,), lr_enc=(0.01,), lr_dec=(0.01,))
    train(cfg)
    holder = "import sys, time; from pathlib import Path; from cenfusion.engine.files import "
    holder += "FolderLock; FolderLock(Path(sys.argv[1])); print('held', flush=True); time.sleep(60)"
    other = subprocess.Popen(
        [sys.executable, "-c", holder, str(cfg.run_dir)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert other.stdout.readline() == "held\n"
        busy = rf"^{cfg.run_dir} is in use by another cen process \(pid {other.pid}\)"
        with pytest.raises(CenError, match=busy):
            train(replace(cfg, epochs=(2,)), resume=cfg.run_dir / "last.pth")
        with pytest.raises(CenError, match=busy):  # not "already holds a run; --resume ..."
            train(replace(cfg, epochs=(2,)))
        with pytest.raises(CenError, match=busy):
            evaluate(SEGMENTATION, cfg)
        with pytest.raises(CenError, match=busy):  # cen seg eval -c EXP adds to the run too
            run_evaluation(cfg, cfg.run_dir / "last.pth", save=True)
    finally:
        other.kill()
        other.wait()
    assert load_checkpoint(cfg.run_dir / "last.pth")["epoch"] == 1
    train(replace(cfg, epochs=(2,)), resume=cfg.run_dir / "last.pth")
    assert load_checkpoint(cfg.run_dir / "last.pth")["epoch"] == 2


def test_a_class_count_other_than_the_datas_names_is_warned_of(tmp_path, caplog) -> None:
    from cenfusion.data.synthetic import generate_segmentation_dataset
    from cenfusion.segmentation.build import check_data

    root = generate_segmentation_dataset(tmp_path / "d", 4, 3, (24, 32), seed=0)
    (root / "classes.txt").write_text("wall\nfloor\n")
    cfg = replace(SYNTHETIC, data=root, quiet=True)
    caplog.set_level(logging.INFO, logger="cenfusion")
    check_data(cfg, training=True)
    said = f"warning: {root} names 2 classes, --num-classes is {cfg.num_classes}: its names go"
    assert said in caplog.text
    caplog.clear()
    (root / "classes.txt").write_text("".join(f"c{k}\n" for k in range(cfg.num_classes)))
    check_data(cfg, training=True)
    assert "warning" not in caplog.text
