"""PNG pictures of a run, written under ``runs/EXP/plots/`` from its logs (see
:mod:`cenfusion.reporting.runlog` for what is read).

Each picture is drawn only when the run logged what it needs; pixel sizes (at 100 dpi) are
fixed per kind so that reports lay out predictably:

======================  =============================================  ===================
file                    what                                           size (px)
======================  =============================================  ===================
``losses.png``          every loss term over epochs                    900 x 500
``scores.png``          one panel per metric, one curve per head       400 per metric x 400
``exchange.png``        overall fraction of gammas under threshold     900 x 400
``iou.png``             per-class IoU of every head, last validation   900 x (120 + 30 K)
``confusion_HEAD.png``  row-normalised confusion matrix per head       (300 + 16 K) square
``exchange_map.png``    per modality: fraction of penalised gammas     500 per modality x
                        under threshold, exchange points x epochs      (150 + 16 points)
``gamma_hist.png``      per modality: histogram of penalised |gamma|,  500 per modality x
                        first and last logged epoch                    400
``samples.png``         translation: inputs, each branch, ensemble,    160 per column x
                        target for a few validation views              (40 + 160 per view)
======================  =============================================  ===================
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cenfusion.data.class_names import resolve_class_names
from cenfusion.engine.files import atomic_write
from cenfusion.reporting.runlog import RunKind, RunLog, line_scores, load_confusion, read_run

__all__ = ["PLOTS_DIR", "SAMPLES_PLOT", "write_plots"]

PLOTS_DIR = "plots"
SAMPLES_PLOT = "samples.png"
DPI = 100
MAX_VIEWS = 4
LABEL_METRICS = {
    "pixel_acc": "pixel acc (%)",
    "mean_acc": "mean acc (%)",
    "miou": "mIoU (%)",
    "fid": "FID",
    "kid_x100": "KID x100",
    "l1": "L1 ([-1, 1] range)",
    "mse": "MSE ([-1, 1] range)",
}


def _figure(width_px: int, height_px: int, **subplots: Any) -> tuple[Any, Any]:
    """A matplotlib Figure of exactly ``width_px x height_px`` and its axes.

    Figures are made without pyplot, so no global backend or figure registry is touched;
    ``savefig`` renders with Agg. matplotlib is imported here, on first use.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI)
    return fig, fig.subplots(**subplots)


def _literal(texts: Sequence[str]) -> list[str]:
    """Names drawn as written: matplotlib reads ``$...$`` as mathematics (and fails on some),
    and a class name is the user's text."""
    return [str(t).replace("$", r"\$") for t in texts]


def _save(fig: Any, path: Path) -> Path:
    """Save at the figure's exact pixel size (no tight bounding box), whole or not at all:
    plots are drawn beside a training that may be stopped at any moment."""
    atomic_write(path, lambda f: fig.savefig(f, dpi=DPI, format="png"))
    return path


def _epoch_axis(ax: Any) -> None:
    ax.set_xlabel("epoch")
    ax.grid(True, alpha=0.3)
    ax.xaxis.get_major_locator().set_params(integer=True)


def plot_losses(run: RunLog, path: Path) -> Path | None:
    """Every loss term over epochs; a log scale when the terms span over two decades."""
    series = run.loss_series()
    if not series:
        return None
    fig, ax = _figure(900, 500)
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", markersize=3, label=name)
    values = [v for _, ys in series.values() for v in ys if math.isfinite(v)]
    if values and min(values) > 0 and max(values) / min(values) > 100:
        ax.set_yscale("log")
    ax.set_title("training losses (epoch means)")
    _epoch_axis(ax)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_scores(run: RunLog, path: Path) -> Path | None:
    """One panel per validation metric with one curve per head."""
    series = run.score_series()
    if not series:
        return None
    fig, axes = _figure(400 * len(series), 400, ncols=len(series), squeeze=False)
    for ax, (metric, heads) in zip(axes[0], series.items()):
        for head, (xs, ys) in heads.items():
            ax.plot(xs, ys, marker="o", markersize=3, label=head)
        ax.set_title(LABEL_METRICS.get(metric, metric))
        _epoch_axis(ax)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_exchange_overall(run: RunLog, path: Path) -> Path | None:
    """The overall fraction of penalised gammas under threshold over epochs."""
    xs, ys = run.exchange_overall()
    if not xs:
        return None
    fig, ax = _figure(900, 400)
    ax.plot(xs, ys, marker="o", markersize=3)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("fraction under threshold")
    ax.set_title("channel exchange: penalised gammas under threshold, all points")
    _epoch_axis(ax)
    fig.tight_layout()
    return _save(fig, path)


def plot_class_iou(
    scores: Mapping[str, Mapping[str, Any]], class_names: Sequence[str], title: str, path: Path
) -> Path | None:
    """Horizontal bars: per-class IoU (%) of every head, classes top to bottom."""
    heads = {h: s["iou"] for h, s in scores.items() if isinstance(s.get("iou"), list)}
    if not heads:
        return None
    k = len(class_names)
    fig, ax = _figure(900, 120 + 30 * k)
    height = 0.8 / len(heads)
    rows = np.arange(k)
    for i, (head, iou) in enumerate(heads.items()):
        values = np.array([float(v) if v is not None else np.nan for v in iou[:k]])
        offset = (i - (len(heads) - 1) / 2) * height
        ax.barh(rows + offset, values, height, label=head)
        for row in np.flatnonzero(np.isnan(values)):  # absent from labels and prediction
            ax.text(0.5, row + offset, "n/a", fontsize=6, va="center", color="0.4")
    ax.set_yticks(rows, _literal(class_names), fontsize=8)
    ax.set_ylim(k - 0.5, -0.5)
    ax.set_xlim(0, 100)
    ax.set_xlabel("IoU (%)")
    ax.set_title(title)
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return _save(fig, path)


def plot_confusion(matrix: np.ndarray, class_names: Sequence[str], title: str, path: Path) -> Path:
    """Row-normalised confusion matrix (rows ground truth): each row is the share of that
    class's pixels given to each predicted class. Percentages are written up to 12 classes."""
    k = matrix.shape[0]
    rows = matrix.sum(1, keepdims=True)
    share = np.divide(matrix, rows, out=np.zeros(matrix.shape), where=rows > 0)
    side = 300 + 16 * k
    fig, ax = _figure(side, side)
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    names = list(class_names)[:k] + [str(i) for i in range(len(class_names), k)]
    font = 8 if k <= 20 else 6
    ax.set_xticks(range(k), _literal(names), rotation=90, fontsize=font)
    ax.set_yticks(range(k), _literal(names), fontsize=font)
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    ax.set_title(title)
    if k <= 12:
        for i in range(k):
            for j in range(k):
                colour = "white" if share[i, j] > 0.5 else "black"
                ax.text(j, i, f"{100 * share[i, j]:.0f}", ha="center", va="center",
                        fontsize=7, color=colour)  # fmt: skip
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return _save(fig, path)


def plot_exchange_map(run: RunLog, path: Path) -> Path | None:
    """Per modality, a heat map of exchange points (rows, network order) x epochs (columns):
    the fraction of that modality's penalised gammas under the threshold."""
    records = [(x, r) for x, r in run.exchange_records() if isinstance(r.get("points"), Mapping)]
    points: list[str] = []
    for _, record in records:
        points += [p for p in record["points"] if p not in points]
    if not points:
        return None
    modalities = max(len(v) for _, r in records for v in r["points"].values())
    grid = np.full((modalities, len(points), len(records)), np.nan)
    for e, (_, record) in enumerate(records):
        for p, name in enumerate(points):
            for m, value in enumerate(record["points"].get(name, [])):
                grid[m, p, e] = value
    names = _modality_names(run, modalities)
    xs = [x for x, _ in records]
    fig, axes = _figure(500 * modalities, 150 + 16 * len(points), ncols=modalities, squeeze=False)
    for m, ax in enumerate(axes[0]):
        image = ax.imshow(grid[m], aspect="auto", cmap="viridis", vmin=0, vmax=1,
                          interpolation="nearest")  # fmt: skip
        ax.set_title(f"{names[m]}: penalised gammas under threshold")
        ax.set_yticks(range(len(points)), points if m == 0 else [""] * len(points), fontsize=6)
        ticks = np.linspace(0, len(xs) - 1, min(len(xs), 10)).round().astype(int)
        ax.set_xticks(ticks, [f"{xs[t]:g}" for t in ticks], fontsize=7)
        ax.set_xlabel("epoch")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02)
    fig.tight_layout()
    return _save(fig, path)


def plot_gamma_histogram(run: RunLog, path: Path) -> Path | None:
    """Per modality, the histogram of its penalised ``|gamma|`` over all exchange points at
    the first and the last logged epoch, on a log axis, with the threshold marked."""
    records = [
        (x, r) for x, r in run.exchange_records() if isinstance(r.get("gamma_hist"), Mapping)
    ]
    if not records:
        return None
    chosen = [records[0], records[-1]] if len(records) > 1 else records
    modalities = max(len(r["gamma_hist"].get("counts", [])) for _, r in chosen)
    if modalities == 0:
        return None
    names = _modality_names(run, modalities)
    thresholds = chosen[-1][1].get("thresholds", [])
    fig, axes = _figure(500 * modalities, 400, ncols=modalities, squeeze=False)
    for m, ax in enumerate(axes[0]):
        below = None
        for (x, record), style in zip(chosen, ({"alpha": 0.5}, {"alpha": 0.9})):
            hist = record["gamma_hist"]
            edges = np.asarray(hist["edges"], dtype=float)
            counts = hist["counts"][m] if m < len(hist["counts"]) else None
            if counts is None or len(counts) != len(edges) - 1:
                continue
            if edges[0] <= 0:
                below = edges[1]
                edges = np.concatenate([[edges[1] / 10], edges[1:]])
            ax.stairs(counts, edges, fill=record is chosen[-1][1], label=f"epoch {x:g}", **style)
        for t in thresholds:
            ax.axvline(t, color="red", linestyle="--", linewidth=1, label=f"threshold {t:g}")
        ax.set_xscale("log")
        ax.set_xlabel("|gamma|" + (f" (leftmost bin: all below {below:g})" if below else ""))
        ax.set_ylabel("channels")
        ax.set_title(f"{names[m]}: penalised gammas")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def _modality_names(run: RunLog, count: int) -> list[str]:
    """The names of ``count`` modalities: the run's heads but the ensemble."""
    return run.head_names({}, count + 1)[:-1]


def _translation_views(run: RunLog) -> tuple[list[str], list[Path]]:
    """The column titles and folders of a translation run's predictions (``input*``, each
    ``fake*`` branch then the ensemble, ``real``); empty lists when there are none."""
    run_dir = run.run_dir
    if not (run_dir / "real").is_dir():
        return [], []
    inputs = sorted(run_dir.glob("input[0-9]*"), key=lambda p: int(p.name[5:]))
    fakes = sorted(run_dir.glob("fake[0-9]*"), key=lambda p: int(p.name[4:]))
    if not inputs or len(fakes) != len(inputs) + 1:
        return [], []
    heads = run.head_names({}, len(fakes))
    titles = [f"input: {h}" for h in heads[:-1]] + [f"output: {h}" for h in heads[:-1]]
    return [*titles, "ensemble", "target"], [*inputs, *fakes, run_dir / "real"]


def plot_translation_samples(run: RunLog, path: Path, max_views: int = MAX_VIEWS) -> Path | None:
    """A grid: one row per validation view (the first ``max_views`` by name), columns the
    inputs, each branch, the ensemble and the target, as the latest evaluation wrote them."""
    titles, folders = _translation_views(run)
    if not folders:
        return None
    names = sorted(p.name for p in folders[-1].glob("*.png"))[:max_views]
    names = [n for n in names if all((f / n).is_file() for f in folders)]
    if not names:
        return None
    cols = len(folders)
    fig, axes = _figure(160 * cols, 40 + 160 * len(names), nrows=len(names), ncols=cols,
                        squeeze=False)  # fmt: skip
    for r, name in enumerate(names):
        for c, folder in enumerate(folders):
            ax = axes[r][c]
            with Image.open(folder / name) as image:
                ax.imshow(np.asarray(image.convert("RGB")))
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=8)
            if c == 0:
                ax.set_ylabel(Path(name).stem, fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def _class_names_for(run: RunLog, count: int, given: Sequence[str] | None) -> tuple[str, ...]:
    data = run.config.get("data")
    synthetic = "data" in run.config and data is None
    if given is not None and len(given) != count:
        given = None
    return resolve_class_names(count, data, given, synthetic=synthetic)


def write_plots(
    run_dir: Path, class_names: Sequence[str] | None = None, kind: RunKind | None = None
) -> list[Path]:
    """Draw every picture the run's logs allow into ``run_dir/plots/``; return their paths.
    ``kind``: the task that made the run (it names the heads).

    ``class_names`` label the per-class pictures; without them (or when their count does not
    fit the run's classes) names come from the run's data root, the built-in NYUDv2-40 /
    SUN RGB-D-37 lists, or ``class i`` (:func:`~cenfusion.data.class_names.resolve_class_names`).

    Raises:
        CenError: ``run_dir`` holds no readable ``metrics.jsonl`` (see
            :func:`~cenfusion.reporting.runlog.read_run`).
    """
    run_dir = Path(run_dir)
    run = read_run(run_dir, kind)
    out = run_dir / PLOTS_DIR
    written = [
        plot_losses(run, out / "losses.png"),
        plot_scores(run, out / "scores.png"),
        plot_exchange_overall(run, out / "exchange.png"),
    ]
    validations = run.validations()
    if validations:
        x, line = validations[-1]
        scores = line_scores(line, run)
        ious = [s["iou"] for s in scores.values() if isinstance(s.get("iou"), list)]
        if ious:
            names = _class_names_for(run, len(ious[0]), class_names)
            title = f"per-class IoU, validation at epoch {x:g}"
            written.append(plot_class_iou(scores, names, title, out / "iou.png"))
    for head, matrix in load_confusion(run_dir).items():
        names = _class_names_for(run, matrix.shape[0], class_names)
        title = f"{head}: confusion (% of each true class)"
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", head)
        written.append(plot_confusion(matrix, names, title, out / f"confusion_{safe}.png"))
    written += [
        plot_exchange_map(run, out / "exchange_map.png"),
        plot_gamma_histogram(run, out / "gamma_hist.png"),
        plot_translation_samples(run, out / SAMPLES_PLOT),
    ]
    return [p for p in written if p is not None]
