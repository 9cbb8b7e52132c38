"""How ``cen bench`` runs its rows (:mod:`cenfusion.bench.command` says what they are)."""

from __future__ import annotations

import platform
import resource
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from cenfusion.bench import cases
from cenfusion.bench.options import DEFAULTS, BenchOptions
from cenfusion.bench.reference import ReferenceCEN
from cenfusion.bench.reference_unet import PerBranchDiscriminator, ReferenceUNet
from cenfusion.bench.roofline import (
    OperatorCost,
    floor,
    floor_by_operator,
    memory_bandwidth,
    operator_costs,
)
from cenfusion.bench.timing import (
    matmul_peak,
    peak_memory_mib,
    profile_step,
    reset_peak_memory,
    time_steps,
)
from cenfusion.engine.run import RuntimeConfig
from cenfusion.engine.runtime import Precision, Runtime, open_runtime, out_of_memory
from cenfusion.errors import CenError
from cenfusion.info import count_flops
from cenfusion.metrics.generative import InceptionFeatures
from cenfusion.segmentation.export import export_onnx
from cenfusion.segmentation.onnx_segmenter import OnnxSegmenter

__all__ = ["format_profiles", "format_table", "run_bench"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def run_bench(options: BenchOptions, runtime: RuntimeConfig) -> dict[str, Any]:
    """Time every row of ``options`` on ``runtime``; returns the run's description (device,
    versions, matrix peaks) and its rows. On a GPU cuDNN chooses its fastest kernels for
    every row alike, the reference's included (its search happens in the warm-up).
    ``runtime.amp`` is refused: each row's precision is one of ``options.precisions``."""
    options.validate(runtime.device)
    runtime.validate()
    if runtime.amp:
        raise CenError("--amp: not in cen bench, whose --precisions name each row's precision")
    searched = torch.backends.cudnn.benchmark
    with open_runtime(runtime) as opened:
        device = opened.device
        torch.backends.cudnn.benchmark = True
        try:
            measured = [pair for mode in options.modes for pair in _rows(options, mode, opened)]
        except RuntimeError as err:
            if not out_of_memory(err):
                raise
            raise CenError(f"out of {device.type} memory: {_sizes(options)}") from err
        finally:
            torch.backends.cudnn.benchmark = searched
        rows = [row for row, _ in measured]
        used = sorted({row["precision"] for row in rows})
        peaks = {p: matmul_peak(device, DTYPES[p]) for p in used}
        bandwidth = memory_bandwidth(device)
        for row, costs in measured:
            peak = peaks[row["precision"]]
            rate = row["gflop_per_image"] * 1e9 * row["images_per_s"]
            row["peak_share"] = rate / peak
            row.update(_floor_fields(costs, peak, bandwidth))
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
        return {
            "device": f"{device.type}: {name}",
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "matmul_peak_tflops": {p: peaks[p] / 1e12 for p in peaks},
            "memory_bandwidth_gbps": bandwidth / 1e9,
            "process_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rows": rows,
        }


def _cpu_name() -> str:
    """The processor's model name (Linux), else what the platform module knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _floor_fields(
    costs: list[OperatorCost] | None, peak: float, bandwidth: float
) -> dict[str, Any]:
    """A row's roofline floor (:mod:`cenfusion.bench.roofline`): its milliseconds, the share
    of them in memory-bound operators, the gigabytes its operators move, and the operators
    with the largest parts of it."""
    if costs is None:
        return dict.fromkeys(
            ("floor_ms", "floor_memory_share", "gbytes_per_step", "floor_by_operator")
        )
    bound = floor(costs, peak, bandwidth)
    return {
        "floor_ms": bound.ms,
        "floor_memory_share": bound.memory_ms / bound.ms,
        "gbytes_per_step": bound.gigabytes,
        "floor_by_operator": floor_by_operator(costs, peak, bandwidth),
    }


def _rows(
    options: BenchOptions, mode: str, opened: Runtime
) -> list[tuple[dict[str, Any], list[OperatorCost] | None]]:
    """Every row of one mode, each with its networks built afresh, and its step's operators
    as eager runs them (:func:`_eager_operators`)."""
    training = mode == "train"
    size, train_size, train_batch = DEFAULTS[options.task]
    size = (options.train_size or train_size) if training else (options.size or size)
    if training:
        batch = train_batch if options.train_batch is None else options.train_batch
    else:
        batch = options.batch
    xs = [x.to(opened.device) for x in cases.images(batch, size, 2)]
    flops = _forward_flops(options, size) * (3 if training else 1)
    extractor = InceptionFeatures(device=opened.device) if mode == "fid" else None
    if extractor is not None:
        flops += _extractor_flops(extractor, size) * (len(xs) + 1)
    variants = [("cenfusion", p) for p in options.precisions]
    if options.reference:
        variants.insert(0, ("reference", "fp32"))
    if options.onnx and not training:
        variants.append(("onnxruntime", "fp32"))
    rows = []
    for impl, precision in variants:
        dtype = DTYPES[precision]
        amp = Precision(dtype != torch.float32, opened.device, dtype)
        step, note = _step(options, impl, mode, xs, amp, opened, extractor)
        reset_peak_memory(opened.device)
        timing = time_steps(step, opened.device, options.warmup, options.runs)
        fast = impl == "cenfusion"
        row = {
            "impl": impl,
            "mode": mode,
            "input": f"{batch}x2x3x{size[0]}x{size[1]}",
            "precision": precision,
            "channels_last": fast and opened.channels_last,
            "compile": fast and opened.compile,
            "compile_mode": opened.compile_mode if fast and opened.compile else None,
            **asdict(timing),
            "images_per_s": batch / (timing.mean_ms / 1e3),
            "peak_mib": peak_memory_mib(opened.device),
            "gflop_per_image": flops / 1e9,
            "note": note,
        }
        if options.profile is not None:
            profiled = profile_step(step, opened.device)
            row["kernels_per_step"] = profiled.kernels
            row["device_busy_ms"] = profiled.device_busy_ms
            row["profile"] = profiled.table
        rows.append((row, _eager_operators(options, impl, mode, batch, size, dtype)))
    reference = rows[0][0] if rows[0][0]["impl"] == "reference" else None
    for row, _ in rows:
        row["vs_reference"] = reference["mean_ms"] / row["mean_ms"] if reference else None
    return rows


def _sizes(options: BenchOptions) -> str:
    """The sizes a bench was asked for, as its flags say them (defaults unsaid)."""
    given = [
        f"{flag} {' '.join(map(str, value)) if isinstance(value, tuple) else value}"
        for flag, value in (
            ("--size", options.size),
            ("--batch", options.batch),
            ("--train-size", options.train_size),
            ("--train-batch", options.train_batch),
        )
        if value is not None
    ]
    return f"{', '.join(given)} do not fit" if given else "the default sizes do not fit"


def _eager_operators(
    options: BenchOptions,
    impl: str,
    mode: str,
    batch: int,
    size: tuple[int, int],
    dtype: torch.dtype,
) -> list[OperatorCost] | None:
    """The operators of a row's step as eager runs them on a GPU, counted on the meta device
    with the networks and inputs in the row's dtype (autocast's casts of the weights, small
    beside the activations, are left out). None for ONNX Runtime, whose operators are not
    PyTorch's, and for FID scoring, whose Inception loads its weights from a file."""
    if impl == "onnxruntime" or mode == "fid":
        return None
    training = mode == "train"
    plain = Precision(False, torch.device("cpu"))
    with torch.device("meta"):
        xs = [torch.empty(batch, 3, *size, dtype=dtype) for _ in range(2)]
        if options.task == "seg":
            model = cases.refinenet(options.enc).to(dtype).train(training)
            net: Callable[[list[torch.Tensor]], torch.Tensor] = model
            if impl == "reference":
                model = ReferenceCEN(model).train(training)
                net = _stacked(model)
            step = _segmentation_call(net, model, xs, plain, training)
        else:
            generator, discriminator = cases.translation_networks(options.ngf, options.num_downs)
            nets = (generator.to(dtype).train(training), discriminator.to(dtype))
            if impl == "reference":
                nets = _reference_translation(*nets, training)
            step = _translation_call(nets, nets, xs, plain, training)
    return operator_costs(step)


def _segmentation_call(
    net: Callable[[list[torch.Tensor]], torch.Tensor],
    model: torch.nn.Module,
    xs: list[torch.Tensor],
    precision: Precision,
    training: bool,
) -> cases.Step:
    """An SGD step of ``net`` (``model``: its parameters and sparsity term), or inference."""
    if training:
        return cases.segmentation_training(net, model, xs, precision)
    return cases.inference(net, xs, precision)


def _translation_call(
    nets: tuple[Callable, Callable],
    bare: tuple[torch.nn.Module, torch.nn.Module],
    xs: list[torch.Tensor],
    precision: Precision,
    training: bool,
) -> cases.Step:
    """A pix2pix step of ``nets`` (``bare``: the modules they call), or the generator's
    inference."""
    if training:
        return cases.translation_training(*bare, nets, xs, precision)
    return cases.inference(nets[0], xs, precision)


def _stacked(reference: ReferenceCEN) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    """The reference's heads stacked, as cenfusion gives them."""
    return lambda inputs: torch.stack(reference(inputs))


def _reference_translation(
    generator: torch.nn.Module, discriminator: torch.nn.Module, training: bool
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The translation networks as the released code runs them: a list of modalities through
    the U-Net, the PatchGAN once per branch."""
    judge = PerBranchDiscriminator(discriminator, generator.num_modalities)
    return ReferenceUNet(generator).train(training), judge


def _forward_flops(options: BenchOptions, size: tuple[int, int]) -> int:
    """FLOPs of one forward pass of the task's network, one image per modality (a training
    step counts three: forward, and backward to inputs and to weights). The network is built
    on the meta device: counting needs its shapes, not its weights."""
    with torch.device("meta"):
        if options.task == "seg":
            network: torch.nn.Module = cases.refinenet(options.enc)
        else:
            network, _ = cases.translation_networks(options.ngf, options.num_downs)
    return count_flops(network, 2, size)


def _extractor_flops(extractor: InceptionFeatures, size: tuple[int, int]) -> int:
    """FLOPs of the FID features of one image of ``size`` (its resize to 299 included)."""
    image = torch.zeros(1, 3, *size, device=next(extractor.net.parameters()).device)
    with FlopCounterMode(display=False) as counter:
        extractor(image)
    return int(counter.get_total_flops())


def _step(
    options: BenchOptions,
    impl: str,
    mode: str,
    xs: list[torch.Tensor],
    precision: Precision,
    opened: Runtime,
    extractor: InceptionFeatures | None,
) -> tuple[cases.Step, str | None]:
    """The step of one row, and a note for the table."""
    training = mode == "train"
    if options.task == "i2i":
        return _translation_step(options, impl, training, xs, precision, opened, extractor)
    model = cases.refinenet(options.enc).to(opened.device).train(training)
    if impl == "onnxruntime":
        return _onnx_step(model, xs, opened), None
    if impl == "cenfusion":
        net = opened.prepare(model, training=training, frozen=not training)
        return _segmentation_call(net, model, xs, precision, training), None
    note = _checked(model, ReferenceCEN, xs, training)
    reference = ReferenceCEN(model).train(training)
    return _segmentation_call(_stacked(reference), reference, xs, precision, training), note


def _translation_step(
    options: BenchOptions,
    impl: str,
    training: bool,
    xs: list[torch.Tensor],
    precision: Precision,
    opened: Runtime,
    extractor: InceptionFeatures | None,
) -> tuple[cases.Step, str | None]:
    """A translation row: the generator's inference (scored by ``extractor`` when given), or
    a pix2pix step."""
    generator, discriminator = cases.translation_networks(options.ngf, options.num_downs)
    generator.to(opened.device).train(training)
    discriminator.to(opened.device)
    if impl == "reference":
        note = _checked(generator, ReferenceUNet, xs, training)
        nets = bare = _reference_translation(generator, discriminator, training)
    else:
        note, bare = None, (generator, discriminator)
        nets = (
            opened.prepare(generator, training=training),
            opened.prepare(discriminator, training=True) if training else discriminator,
        )
    if extractor is not None:
        return cases.fid_views(nets[0], extractor, xs, precision), note
    return _translation_call(nets, bare, xs, precision, training), note


def _checked(
    model: torch.nn.Module,
    make_reference: Callable[[Any], torch.nn.Module],
    xs: list[torch.Tensor],
    training: bool,
) -> str:
    """The table's note for a reference row, once it is shown to compute ``model``'s function."""
    difference = cases.reference_difference(model, make_reference, xs, training)
    if not difference < 1e-4:
        raise CenError(f"cenfusion and the reference differ ({difference:.1e} relative)")
    return f"same outputs as cenfusion (max rel. diff. {difference:.0e})"


def _onnx_step(model: torch.nn.Module, xs: list[torch.Tensor], opened: Runtime) -> cases.Step:
    providers = ("CUDAExecutionProvider",) * (opened.device.type == "cuda")
    height, width = xs[0].shape[-2:]
    with tempfile.TemporaryDirectory(prefix="cen-bench-") as folder:
        path = Path(folder) / "model.onnx"
        export_onnx(model.cpu().eval(), path, height=height, width=width)
        session = OnnxSegmenter(path, (*providers, "CPUExecutionProvider"))
    arrays = [x.cpu().numpy() for x in xs]
    return lambda: session(arrays)


def format_table(result: dict[str, Any]) -> str:
    """The markdown table of a run, under a line naming the device and the matrix peaks."""
    peaks = ", ".join(f"{p} {v:.2f}" for p, v in result["matmul_peak_tflops"].items())
    title = (
        f"{result['device']}, {result['threads']} threads, torch {result['torch']}, "
        f"process peak RSS {result['process_peak_rss_mib']:.0f} MiB; "
        f"memory bandwidth {result['memory_bandwidth_gbps']:.0f} GB/s"
    )
    columns = [
        "impl",
        "mode",
        "input",
        "precision",
        "layout",
        "ms",
        "img/s",
        "x ref",
        "MiB",
        "GFLOP/img",
        "%peak",
        "floor ms",
        "note",
    ]
    lines = [
        f"{title}; matrix peak (TFLOP/s): {peaks}",
        "",
        "| " + " | ".join(columns) + " |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in result["rows"]:
        layout = _layout(row)
        memory = "-" if row["peak_mib"] is None else f"{row['peak_mib']:.0f}"
        speedup = "-" if row["vs_reference"] is None else f"{row['vs_reference']:.2f}"
        spread = f" ± {row['std_ms']:.1f}" if row["runs"] > 1 else " (1 run)"
        lines.append(
            f"| {row['impl']} | {row['mode']} | {row['input']} | {row['precision']} | {layout} "
            f"| {row['mean_ms']:.1f}{spread} | {row['images_per_s']:.2f} "
            f"| {speedup} | {memory} | {row['gflop_per_image']:.1f} "
            f"| {100 * row['peak_share']:.1f} | {_floor(row)} | {row['note'] or ''} |"
        )
    busy = [row for row in result["rows"] if row.get("device_busy_ms") is not None]
    if busy:
        lines += [
            "",
            "Profiled steps: device kernels, and how much of the step the device computed",
        ]
        lines += [f"- {_name(row)}: {_busy(row)}" for row in busy]
    return "\n".join(lines)


def format_profiles(result: dict[str, Any]) -> str:
    """A markdown section per profiled row: its device work (CUDA), operator tables and the
    operators with the largest parts of its floor."""
    sections = []
    for row in result["rows"]:
        if "profile" in row:
            work = f": {_busy(row)}" if row["device_busy_ms"] is not None else ""
            section = f"## {_name(row)}{work}\n\n{row['profile']}\n"
            if row["floor_by_operator"] is not None:
                section += f"\n{_floor_table(row)}\n"
            sections.append(section)
    return "\n".join(sections)


def _floor_table(row: dict[str, Any]) -> str:
    """The operators with the largest parts of a row's floor, as a markdown table."""
    lines = [
        f"Floor {row['floor_ms']:.1f} ms, by operator (largest parts):",
        "",
        "| operator | calls | GB | floor ms | of it bound by memory |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {part['operator']} | {part['calls']} | {part['gbytes']:.2f} "
        f"| {part['floor_ms']:.2f} | {part['memory_ms']:.2f} |"
        for part in row["floor_by_operator"]
    ]
    return "\n".join(lines)


def _floor(row: dict[str, Any]) -> str:
    """The row's roofline floor, and the share of it bound by memory rather than by the peak."""
    if row["floor_ms"] is None:
        return "-"
    return f"{row['floor_ms']:.1f} ({100 * row['floor_memory_share']:.0f}% mem)"


def _layout(row: dict[str, Any]) -> str:
    compiled = row["compile_mode"] or "default"
    compiled = "compile" + (f" ({compiled})" if compiled != "default" else "")
    return (
        "+".join(["channels-last"] * row["channels_last"] + [compiled] * row["compile"]) or "NCHW"
    )


def _name(row: dict[str, Any]) -> str:
    return f"{row['impl']} {row['mode']} {row['input']} {row['precision']} {_layout(row)}"


def _busy(row: dict[str, Any]) -> str:
    """Device work of a profiled step against the step's timed mean."""
    busy, step = row["device_busy_ms"], row["mean_ms"]
    return (
        f"{row['kernels_per_step']} kernels, device busy {busy:.1f} of {step:.1f} ms "
        f"({100 * busy / step:.0f}%)"
    )
