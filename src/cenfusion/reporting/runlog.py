"""Reading a run folder ``runs/EXP`` into series the plots and the report draw.

What is read, every part optional unless said:

- ``config.yaml``: the resolved config (a mapping), shown as is; ``data`` names classes, and
  the task's :class:`RunKind` names heads from it.
- ``metrics.jsonl`` (required): one JSON object a line. A line with an ``evaluate`` key is a
  stand-alone evaluation; every other line is a training epoch. Keys of a line:

  ==========================  ==========================================================
  ``stage``, ``epoch``        position; epochs are ordered by (stage, epoch), the last
                              line of a repeated (stage, epoch) wins (a resumed run)
  ``global_epoch``            x value of the line when given, else its rank in that order
  ``train_loss``, ``loss*``,  numbers: one loss curve each
  ``penalty``
  ``losses``                  ``{name: number}``: one loss curve each (e.g. per head)
  ``val``                     ``{head: {metric: number, "iou": [one per class]}}``:
                              score curves per head, per-class IoU bars
  ``fid``, ``kid_x100``,      ``[branch 0, ..., ensemble]``: score curves per head
  ``l1``, ``mse``             (translation, under ``val`` or at the top level); named by
                              ``heads`` when the line has it, else by the run's kind
  ``exchange``                a number (overall fraction of penalised gammas under
                              threshold) or the record of :mod:`cenfusion.reporting.exchange`
  ``exchange_fraction``       the overall fraction (older segmentation lines)
  ``best``                    true on the line whose evaluation became the best
  ==========================  ==========================================================

- ``confusion.npz``: the latest validation's confusion matrices, one ``(C, C)`` integer
  array per head name, rows ground truth (:func:`save_confusion` writes it).
- ``images/*.png`` (segmentation panels) or ``input*/``, ``fake*/``, ``real/`` (translation
  predictions, the ensemble last): sample predictions.
"""

from __future__ import annotations

import json
import math
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from cenfusion.data.listfile import read_utf8
from cenfusion.engine.files import atomic_write
from cenfusion.engine.run import CONFIG, CONFUSION, METRICS
from cenfusion.errors import CenError

__all__ = [
    "TRANSLATION_METRICS",
    "RunKind",
    "RunLog",
    "line_scores",
    "load_confusion",
    "read_run",
    "save_confusion",
]

TRANSLATION_METRICS = ("fid", "kid_x100", "l1", "mse")

Series = tuple[list[float], list[float]]


def _no_names(config: Mapping[str, Any], count: int) -> list[str] | None:
    return None


@dataclass(frozen=True)
class RunKind:
    """What a report needs to know of the task that made a run: its title, and the names of
    the ``count`` heads (branches, then the ensemble) of a run with ``config``, or None when
    the config does not say. Each task gives its own; the registry of tasks finds it."""

    title: str = "cenfusion run"
    names: Callable[[Mapping[str, Any], int], list[str] | None] = _no_names


@dataclass
class RunLog:
    """A run's config and metric lines. ``epochs``: training lines in order, each with its x
    value in ``xs``; ``evaluations``: the stand-alone evaluation lines, in file order."""

    run_dir: Path
    config: dict[str, Any]
    config_text: str
    epochs: list[dict[str, Any]] = field(default_factory=list)
    xs: list[float] = field(default_factory=list)
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    kind: RunKind = field(default_factory=RunKind)

    def head_names(self, line: Mapping[str, Any], count: int) -> list[str]:
        """Names of ``count`` heads (branches, then the ensemble): the line's ``heads``, else
        the run kind's names from the config, else ``branch k``."""
        heads = line.get("heads")
        if isinstance(heads, list) and len(heads) == count:
            return [str(h) for h in heads]
        names = self.kind.names(self.config, count)
        if names is not None and len(names) == count:
            return names
        return [f"branch {k}" for k in range(count - 1)] + ["ensemble"]

    def loss_series(self) -> dict[str, Series]:
        """``{loss name: (xs, values)}`` over the training lines."""
        series: dict[str, Series] = {}
        for x, line in zip(self.xs, self.epochs):
            values = {k: v for k, v in line.items() if _is_loss_key(k) and _is_number(v)}
            losses = line.get("losses")
            if isinstance(losses, Mapping):
                values.update({str(k): v for k, v in losses.items() if _is_number(v)})
            for name, value in values.items():
                xs, ys = series.setdefault(name, ([], []))
                xs.append(x)
                ys.append(float(value))
        return series

    def score_series(self) -> dict[str, dict[str, Series]]:
        """``{metric: {head: (xs, values)}}`` over the training lines with an evaluation."""
        series: dict[str, dict[str, Series]] = {}
        for x, line in zip(self.xs, self.epochs):
            for head, scores in line_scores(line, self).items():
                for metric, value in scores.items():
                    if _is_number(value):
                        xs, ys = series.setdefault(metric, {}).setdefault(head, ([], []))
                        xs.append(x)
                        ys.append(float(value))
        return series

    def validations(self) -> list[tuple[float, dict[str, Any]]]:
        """``(x, line)`` of the training lines that hold an evaluation."""
        return [(x, line) for x, line in zip(self.xs, self.epochs) if line_scores(line, self)]

    def best_validation(self) -> tuple[float, dict[str, Any]] | None:
        """The best evaluated epoch: the last line marked ``best``, else the highest ensemble
        mIoU, else the lowest ensemble FID or L1; None without any evaluation."""
        evaluated = self.validations()
        if not evaluated:
            return None
        marked = [item for item in evaluated if item[1].get("best") is True]
        if marked:
            return marked[-1]
        for metric, sign in (("miou", 1.0), ("fid", -1.0), ("l1", -1.0)):
            keyed = [
                (sign * float(s[metric]), i)
                for i, (_, line) in enumerate(evaluated)
                for s in [_ensemble(line_scores(line, self))]
                if _is_number(s.get(metric)) and not math.isnan(float(s[metric]))
            ]
            if keyed:
                return evaluated[max(keyed)[1]]
        return evaluated[-1]

    def exchange_overall(self) -> Series:
        """``(xs, overall fraction)`` of the lines that log one (none for a model without
        exchange points, which exchanges nothing by construction)."""
        xs, ys = [], []
        for x, line in zip(self.xs, self.epochs):
            value = line.get("exchange", line.get("exchange_fraction"))
            if isinstance(value, Mapping):
                value = value.get("overall") if value.get("points", True) else None
            if _is_number(value):
                xs.append(x)
                ys.append(float(value))
        return xs, ys

    def exchange_records(self) -> list[tuple[float, dict[str, Any]]]:
        """``(x, record)`` of the lines whose ``exchange`` is a full record."""
        return [
            (x, line["exchange"])
            for x, line in zip(self.xs, self.epochs)
            if isinstance(line.get("exchange"), Mapping)
        ]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_loss_key(key: str) -> bool:
    return key.startswith(("loss", "train_loss")) or key == "penalty"


def _ensemble(scores: Mapping[str, Mapping[str, Any]]) -> Mapping[str, Any]:
    if "ensemble" in scores:
        return scores["ensemble"]
    return next(reversed(scores.values())) if scores else {}


def line_scores(line: Mapping[str, Any], run: RunLog | None = None) -> dict[str, dict[str, Any]]:
    """``{head: {metric: value}}`` of one metrics line: its ``val`` mapping, plus the
    translation lists (``fid``, ``kid_x100``, ``l1``, ``mse``) split per head. Empty when the
    line holds no evaluation."""
    scores: dict[str, dict[str, Any]] = {}
    val = line.get("val")
    if isinstance(val, Mapping):
        for head, values in val.items():
            if isinstance(values, Mapping):
                scores[str(head)] = dict(values)
    for metric in TRANSLATION_METRICS:
        values = line.get(metric)
        if not isinstance(values, list) or not values:
            continue
        if run is not None:
            heads = run.head_names(line, len(values))
        else:
            heads = [f"branch {k}" for k in range(len(values) - 1)] + ["ensemble"]
        for head, value in zip(heads, values):
            scores.setdefault(head, {})[metric] = value
    return scores


def _lift_translation(line: dict[str, Any]) -> dict[str, Any]:
    """Translation lines keep their lists under ``val``; read them at the top level."""
    val = line.get("val")
    if not isinstance(val, Mapping) or not any(k in val for k in TRANSLATION_METRICS):
        return line
    rest = {k: v for k, v in val.items() if k not in TRANSLATION_METRICS}
    lifted = {k: val[k] for k in TRANSLATION_METRICS if k in val}
    return {
        **{k: v for k, v in line.items() if k != "val"},
        **lifted,
        **({"val": rest} if rest else {}),
    }


def _epoch_key(line: Mapping[str, Any], index: int) -> tuple[float, float]:
    stage = line.get("stage", 1)
    epoch = line.get("epoch", index + 1)
    return (
        float(stage) if _is_number(stage) else 1.0,
        float(epoch) if _is_number(epoch) else float(index + 1),
    )


def read_run(run_dir: str | Path, kind: RunKind | None = None) -> RunLog:
    """Read ``run_dir``'s config and metric lines, a run of ``kind`` (default: unknown).

    Raises:
        CenError: no ``metrics.jsonl``, a line that is not a JSON object, or a config that
            is not a YAML mapping (each named with file and line).
    """
    run_dir = Path(run_dir)
    metrics_path = run_dir / METRICS
    if not run_dir.is_dir():
        what = "a file" if run_dir.exists() else "no such folder"
        raise CenError(f"{run_dir}: {what}, expected a run folder (runs/EXP)")
    if not metrics_path.is_file():
        raise CenError(f"{run_dir}: no {METRICS}; expected a run folder (runs/EXP)")
    config_path = run_dir / CONFIG
    config: dict[str, Any] = {}
    config_text = ""
    if config_path.is_file():
        config_text = read_utf8(config_path)
        try:
            loaded = yaml.safe_load(config_text)
        except yaml.YAMLError as err:
            raise CenError(f"{config_path}: not valid YAML ({str(err).splitlines()[0]})") from err
        if loaded is not None and not isinstance(loaded, dict):
            raise CenError(f"{config_path}: expected a mapping of settings")
        config = loaded or {}
    by_key: dict[tuple[float, float], dict[str, Any]] = {}
    evaluations: list[dict[str, Any]] = []
    texts = [line + "\n" for line in read_utf8(metrics_path).split("\n")]
    texts[-1] = texts[-1][:-1]  # the text after the last newline, if any
    for number, text in enumerate(texts, 1):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
        except json.JSONDecodeError as err:
            if number == len(texts) and not text.endswith("\n"):
                break  # the line a running run is appending
            raise CenError(f"{metrics_path}:{number}: not JSON ({err.msg})") from err
        if not isinstance(line, dict):
            raise CenError(f"{metrics_path}:{number}: expected a JSON object")
        line = _lift_translation(line)
        if "evaluate" in line:
            evaluations.append(line)
        else:
            by_key[_epoch_key(line, len(by_key))] = line
    keys = sorted(by_key)
    epochs = [by_key[k] for k in keys]
    xs = [
        float(line["global_epoch"]) if _is_number(line.get("global_epoch")) else float(rank + 1)
        for rank, line in enumerate(epochs)
    ]
    return RunLog(run_dir, config, config_text, epochs, xs, evaluations, kind or RunKind())


def save_confusion(run_dir: str | Path, matrices: Mapping[str, Any]) -> Path:
    """Write ``{head: (C, C) counts}`` (tensors or arrays, rows ground truth) to
    ``run_dir/confusion.npz`` atomically; return its path."""
    run_dir = Path(run_dir)
    arrays = {}
    for head, matrix in matrices.items():
        array = np.asarray(matrix.cpu() if hasattr(matrix, "cpu") else matrix, dtype=np.int64)
        if array.ndim != 2 or array.shape[0] != array.shape[1]:
            raise ValueError(f"confusion matrix of {head}: expected (C, C), got {array.shape}")
        arrays[str(head)] = array
    path = run_dir / CONFUSION
    atomic_write(path, lambda f: np.savez_compressed(f, **arrays))
    return path


def load_confusion(run_dir: str | Path) -> dict[str, np.ndarray]:
    """``{head: (C, C) int64}`` from ``run_dir/confusion.npz``; empty when absent.

    Raises:
        CenError: the file exists but is not a readable archive of square matrices.
    """
    path = Path(run_dir) / CONFUSION
    if not path.is_file():
        return {}
    try:
        with np.load(path, allow_pickle=False) as archive:
            matrices = {name: np.asarray(archive[name], dtype=np.int64) for name in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise CenError(f"{path}: not a readable .npz archive ({type(err).__name__})") from err
    for name, matrix in matrices.items():
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise CenError(f"{path}: {name} is {matrix.shape}, expected a square matrix")
    return matrices
