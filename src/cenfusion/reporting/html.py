"""``cen report runs/EXP``: one self-contained HTML page of a run.

The page holds the config, the final scores, every plot of :func:`write_plots` and a few
sample predictions, with images embedded as base64 ``data:`` URIs and the style inline: no
script and no external resource, so it opens offline and can be mailed as one file.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cenfusion.reporting.plots import SAMPLES_PLOT, write_plots
from cenfusion.reporting.runlog import RunKind, RunLog, line_scores, read_run

__all__ = ["REPORT_FILE", "write_report"]

REPORT_FILE = "report.html"
MAX_SAMPLES = 6
DIGITS = {"l1": 4, "mse": 4}
HEADERS = {
    "pixel_acc": "pixel acc",
    "mean_acc": "mean acc",
    "miou": "mIoU",
    "fid": "FID",
    "kid_x100": "KID x100",
    "l1": "L1",
    "mse": "MSE",
}
STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1300px; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; }
table { border-collapse: collapse; margin: .5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: .25em .7em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
figure { margin: 1em 0; } figcaption { color: #555; font-size: .9em; }
img { max-width: 100%; border: 1px solid #eee; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; font-size: .85em; }
"""


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _figure(path: Path, caption: str) -> str:
    return (
        f'<figure><img src="{_data_uri(path)}" alt="{html.escape(caption)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def _cell(metric: str, value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "<td>-</td>"
    if math.isnan(float(value)):
        return "<td>n/a</td>"
    return f"<td>{float(value):.{DIGITS.get(metric, 2)}f}</td>"


def _score_table(scores: Mapping[str, Mapping[str, Any]]) -> str:
    """Rows: heads; columns: every scalar metric the heads report, in first-seen order."""
    metrics: list[str] = []
    for values in scores.values():
        metrics += [
            m
            for m, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and m not in metrics
        ]
    head = "".join(f"<th>{html.escape(HEADERS.get(m, m))}</th>" for m in metrics)
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td>"
        + "".join(_cell(m, values.get(m)) for m in metrics)
        + "</tr>"
        for name, values in scores.items()
    )
    return f"<table><tr><th>head</th>{head}</tr>{rows}</table>"


def _epoch_label(line: Mapping[str, Any], x: float) -> str:
    if "stage" not in line:
        return f"epoch {x:g}"
    within = "" if line.get("epoch") == x else f", epoch {line.get('epoch')}"  # counted per stage
    return f"epoch {x:g} (stage {line['stage']}{within})"


def _results(run: RunLog) -> str:
    parts: list[str] = []
    best = run.best_validation()
    validations = run.validations()
    if best is not None:
        x, line = best
        parts.append(f"<h3>Best validation, {html.escape(_epoch_label(line, x))}</h3>")
        parts.append(_score_table(line_scores(line, run)))
    if validations and (best is None or validations[-1][1] is not best[1]):
        x, line = validations[-1]
        parts.append(f"<h3>Last validation, {html.escape(_epoch_label(line, x))}</h3>")
        parts.append(_score_table(line_scores(line, run)))
    for line in run.evaluations[-3:]:
        scores = line_scores(line, run)
        if scores:
            what = line.get("checkpoint", line.get("evaluate"))
            how = [line[k] for k in ("protocol", "data", "val_list") if line.get(k)]
            said = f" ({', '.join(map(str, how))})" if how else ""
            parts.append(f"<h3>Evaluation of {html.escape(str(what) + said)}</h3>")
            parts.append(_score_table(scores))
    xs, fractions = run.exchange_overall()
    if fractions:
        parts.append(
            f"<p>Channel exchange at epoch {xs[-1]:g}: {100 * fractions[-1]:.1f}% of the "
            "penalised gammas are under the threshold.</p>"
        )
    if run.epochs:
        seconds = [
            line["seconds"] for line in run.epochs if isinstance(line.get("seconds"), (int, float))
        ]
        count = len(run.epochs)
        summary = f"{count} training epoch{'s' * (count != 1)} logged"
        if seconds:
            summary += f", {sum(seconds):.0f} s of training"
        parts.append(f"<p>{summary}.</p>")
    return "".join(parts) or "<p>No scores logged yet.</p>"


def _sample_images(run: RunLog, plots: Sequence[Path], max_samples: int) -> list[Path]:
    grid = [p for p in plots if p.name == SAMPLES_PLOT]
    panels = sorted((run.run_dir / "images").glob("*.png"))[:max_samples]
    return grid + panels


def write_report(
    run_dir: Path,
    class_names: Sequence[str] | None = None,
    max_samples: int = MAX_SAMPLES,
    kind: RunKind | None = None,
) -> Path:
    """Regenerate the run's plots and write ``run_dir/report.html``; return its path.
    ``kind``: the task that made the run (its title, the names of its heads).

    Sample predictions are the translation grid (``plots/samples.png``) and up to
    ``max_samples`` segmentation panels from ``run_dir/images`` (``--save-img``).

    Raises:
        CenError: ``run_dir`` holds no readable ``metrics.jsonl``.
    """
    run_dir = Path(run_dir)
    plots = write_plots(run_dir, class_names, kind)
    run = read_run(run_dir, kind)
    samples = _sample_images(run, plots, max_samples)
    task = run.kind.title
    title = f"cenfusion run {run_dir.name}"
    sections = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{html.escape(task)}, folder <code>{html.escape(str(run_dir.resolve()))}</code></p>",
        "<h2>Results</h2>",
        _results(run),
        "<h2>Plots</h2>",
        "".join(
            _figure(p, p.relative_to(run_dir).as_posix()) for p in plots if p.name != SAMPLES_PLOT
        )
        or "<p>Nothing to plot yet.</p>",
    ]
    if samples:
        sections += ["<h2>Sample predictions</h2>"]
        sections += [_figure(p, p.relative_to(run_dir).as_posix()) for p in samples]
    sections += [
        "<h2>Config</h2>",
        f"<pre>{html.escape(run.config_text or '(no config.yaml)')}</pre>",
    ]
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>"
        "<body>\n" + "\n".join(sections) + "\n</body></html>\n"
    )
    path = run_dir / REPORT_FILE
    path.write_text(page, encoding="utf-8")
    return path
