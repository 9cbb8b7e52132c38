"""Speed of cenfusion's CEN RefineNet against the per-modality reference, on the same weights.

    python benchmarks/seg_speed.py --depths 50 101 [--device cuda] [--amp none bf16]
        [--channels-last] [--compile] [--onnx [FILE]] [--json results.json]

First checks, in this process, that cenfusion and the per-modality reference
(``cenfusion.bench.reference``: the released way of computing) give the same outputs on the same
weights, in eval and in training mode. Then times each case in a fresh subprocess (same
seed, same weights); the cases of one net and mode run side by side and take their timed
steps in turn, so that a shared machine's drift hits them alike. Cases: inference (eval, no
grad) and a training step (forward, cross-entropy on every head plus the L1 sparsity term,
backward, SGD). Rows: the reference and cenfusion in fp32, then cenfusion with the
requested fast paths (one row per ``--amp`` value). Reported: median step time after
warm-up, images/s, peak memory (CPU: the subprocess's max RSS; CUDA:
``max_memory_allocated``), FLOPs per image (torch's FLOP counter) and the achieved rate
against a matrix peak measured in the same run. Prints a markdown table; ``--json``
writes every number.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import operator
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from cenfusion import create_cen_refinenet
from cenfusion.bench.cases import penalty_of, reference_difference, with_exchange
from cenfusion.bench.reference import ReferenceCEN
from cenfusion.bench.timing import matmul_peak, profile_step
from cenfusion.engine.heap import kept_cpu_memory
from cenfusion.models.refinenet import CENRefineNet

DTYPES = {"none": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LAMDA = 2e-4
EXPORT = "export"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--depths", type=int, nargs="+", default=[50], choices=[50, 101, 152])
    p.add_argument("--cases", nargs="+", default=["infer", "train"], choices=["infer", "train"])
    p.add_argument("--infer-size", type=int, nargs=2, default=[480, 640], metavar=("H", "W"))
    p.add_argument("--infer-batch", type=int, default=1)
    p.add_argument("--train-size", type=int, nargs=2, default=[256, 256], metavar=("H", "W"))
    p.add_argument("--train-batch", type=int, default=2)
    p.add_argument("--modalities", type=int, default=2)
    p.add_argument("--num-classes", type=int, default=40)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5, help="timed steps; the median is reported")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--channels-last", action="store_true", help="fast path: NHWC memory format")
    p.add_argument(
        "--amp",
        nargs="+",
        default=["none"],
        choices=list(DTYPES),
        help="fast path: autocast dtype, one row each (fp16 with GradScaler, cuda only)",
    )
    p.add_argument("--compile", action="store_true", help="fast path: torch.compile")
    p.add_argument(
        "--onnx",
        nargs="?",
        const=EXPORT,
        default=None,
        metavar="FILE",
        help="an inference row via onnxruntime: alone, the benchmark's own network exported "
        "at --infer-size (outputs compared with PyTorch's); with FILE, that exported file",
    )
    p.add_argument(
        "--keep-memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="on the CPU, every case keeps freed memory in its process, as cenfusion's runs do "
        "(cenfusion.engine.heap); --no-keep-memory: glibc's defaults for every case",
    )
    p.add_argument(
        "--one-at-a-time",
        action="store_true",
        help="run the cases one after another instead of side by side with alternating steps "
        "(for machines that cannot hold every case of a net and mode at once)",
    )
    p.add_argument("--check-size", type=int, nargs=2, default=[64, 96], metavar=("H", "W"))
    p.add_argument("--json", default=None, help="write every number here")
    p.add_argument(
        "--profile",
        default=None,
        metavar="FILE",
        help="profile one more step of every case (torch.profiler) and write each case's "
        "busiest operators and its count of device kernels per step to FILE",
    )
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if "fp16" in args.amp and args.device != "cuda":
        p.error("--amp fp16 needs --device cuda (bf16 is the CPU's half precision)")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device visible to torch")
    return args


def build_model(depth: int, args: argparse.Namespace, device: torch.device) -> CENRefineNet:
    """The benchmark's network, identical in every process: seeded, with exchange active.

    Half of each modality's penalised gammas are set to zero, as after sparsity training, so
    the exchange really copies channels.
    """
    torch.manual_seed(0)
    model = create_cen_refinenet(
        depth=depth, num_classes=args.num_classes, num_modalities=args.modalities
    )
    return with_exchange(model).to(device)


def make_inputs(batch: int, size: list[int], args: argparse.Namespace, device: torch.device):
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(batch, 3, *size, generator=gen) for _ in range(args.modalities)]
    target = torch.randint(
        0, args.num_classes, (batch, -(-size[0] // 4), -(-size[1] // 4)), generator=gen
    )
    return [x.to(device) for x in xs], target.to(device)


def check_same(depth: int, args: argparse.Namespace, device: torch.device) -> float:
    """Largest difference between cenfusion and the reference, relative to the output scale
    (:func:`cenfusion.bench.cases.reference_difference`). Raises ``SystemExit`` if they
    differ."""
    xs, _ = make_inputs(2, args.check_size, args, device)
    worst = reference_difference(build_model(depth, args, device), ReferenceCEN, xs, training=True)
    if not worst < 1e-4:
        raise SystemExit(f"R{depth}: cenfusion and the reference differ ({worst:.2e} relative)")
    return worst


def variant(case: dict) -> str:
    if case["impl"] == "onnx":
        return "onnxruntime"
    parts = ["fp32" if case["amp"] == "none" else case["amp"]]
    parts += [flag.replace("_", "-") for flag in ("channels_last", "compile") if case[flag]]
    return "+".join(parts)


def make_step(forward: Callable, module, penalty: Callable, case: dict, args, device):
    """One inference call or one training step of ``forward`` on fixed random inputs."""
    train = case["mode"] == "train"
    batch, size = (
        (args.train_batch, args.train_size) if train else (args.infer_batch, args.infer_size)
    )
    xs, target = make_inputs(batch, size, args, device)
    if case["channels_last"]:
        xs = [x.contiguous(memory_format=torch.channels_last) for x in xs]
    amp = case["amp"]

    def autocast():
        return torch.autocast(device.type, dtype=DTYPES[amp], enabled=amp != "none")

    module.train(train)
    if not train:

        def infer() -> None:
            with torch.no_grad(), autocast():
                forward(xs)

        return infer
    opt = torch.optim.SGD(module.parameters(), lr=1e-3, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")

    def step() -> None:
        with autocast():
            outs = forward(xs)
            loss = sum(F.cross_entropy(o.float(), target) for o in outs) + penalty()
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    return step


def time_steps(step: Callable, device: torch.device, warmup: int, repeats: int) -> list[float]:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return times


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def compiled_or_eager(module, make: Callable) -> tuple[Callable, str | None]:
    """A step of ``torch.compile(module)``, or of the eager module if compiling fails."""
    try:
        step = make(torch.compile(module))
        step()
        return step, None
    except Exception as err:  # noqa: BLE001 (any compiler failure falls back to eager)
        first = (str(err).strip().splitlines() or [""])[0][:200]
        note = f"torch.compile failed ({type(err).__name__}: {first}); timed eager"
        print(note, file=sys.stderr)
        return make(module), note


Prepared = tuple[Callable[[], None], Callable[[list[float]], dict]]


def prepare_case(case: dict, args: argparse.Namespace) -> Prepared:
    """Build one case in this (fresh) process: its step, and the function that turns the
    step times into its row (peak memory, FLOPs)."""
    device = torch.device(args.device)
    if args.onnx and case["impl"] == "onnx":
        return prepare_onnx(case, args)
    torch.backends.cudnn.benchmark = device.type == "cuda" and variant(case) != "fp32"
    model = build_model(case["depth"], args, device)
    if case["impl"] == "reference":
        module = ReferenceCEN(model)
    elif case["channels_last"]:
        module = model.to(memory_format=torch.channels_last)
    else:
        module = model

    penalty = penalty_of(module, LAMDA)

    def make(forward: Callable) -> Callable:
        return make_step(forward, module, penalty, case, args, device)

    step, note = compiled_or_eager(module, make) if case["compile"] else (make(module), None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def finish(times: list[float]) -> dict:
        peak = peak_memory_mib(device)
        with FlopCounterMode(display=False) as counter:
            (make(module) if case["compile"] else step)()
        batch = args.train_batch if case["mode"] == "train" else args.infer_batch
        median = statistics.median(times)
        return {
            **case,
            **(asdict(profile_step(step, device)) if args.profile else {}),
            "variant": variant(case),
            "times_s": times,
            "median_s": median,
            "images_per_s": batch / median,
            "peak_mib": peak,
            "flops_per_image": counter.get_total_flops() / batch,
            "note": note,
        }

    return step, finish


def prepare_onnx(case: dict, args: argparse.Namespace) -> Prepared:
    """Inference through onnxruntime, on the benchmark's network exported here (its outputs
    compared with PyTorch's, in the row's note) or on the given file's own weights."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise CaseError("onnxruntime not installed: skipped")
    xs, _ = make_inputs(args.infer_batch, args.infer_size, args, torch.device("cpu"))
    model, path = None, args.onnx
    if args.onnx == EXPORT:
        from cenfusion.segmentation.export import export_onnx

        model = build_model(case["depth"], args, torch.device("cpu")).eval()
        path = Path(tempfile.mkdtemp()) / f"r{case['depth']}.onnx"
        export_onnx(model, path, height=args.infer_size[0], width=args.infer_size[1])
    wanted = ["CUDAExecutionProvider"] if args.device == "cuda" else []
    providers = [p for p in wanted if p in ort.get_available_providers()] + ["CPUExecutionProvider"]
    options = ort.SessionOptions()
    if args.threads:
        options.intra_op_num_threads = args.threads
    session = ort.InferenceSession(str(path), options, providers=providers)
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(xs):
        raise CaseError(f"{path}: {len(names)} inputs, expected {len(xs)} modalities")
    feeds = {name: x.numpy() for name, x in zip(names, xs)}
    note = None
    if model is not None:
        with torch.no_grad():
            expected = model(xs)
        got = session.run(None, feeds)
        diff = max(float((torch.from_numpy(g) - e).abs().max()) for g, e in zip(got, expected))
        note = f"onnxruntime outputs equal PyTorch's within {diff:.1e} (max abs diff)"
        path.unlink()

    def finish(times: list[float]) -> dict:
        median = statistics.median(times)
        return {
            **case,
            "variant": f"onnxruntime ({session.get_providers()[0]})",
            "times_s": times,
            "median_s": median,
            "images_per_s": args.infer_batch / median,
            "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "note": note,
        }

    return lambda: session.run(None, feeds), finish


def cases(args: argparse.Namespace) -> list[dict]:
    """Reference and cenfusion in fp32, then one fast-path row per ``--amp`` value."""
    out = []
    fast = args.channels_last or args.compile
    for depth in args.depths:
        for mode in args.cases:
            base = {
                "depth": depth,
                "mode": mode,
                "channels_last": False,
                "amp": "none",
                "compile": False,
            }
            out += [{**base, "impl": "reference"}, {**base, "impl": "cenfusion"}]
            out += [
                {
                    **base,
                    "impl": "cenfusion",
                    "channels_last": args.channels_last,
                    "amp": amp,
                    "compile": args.compile,
                }
                for amp in args.amp
                if fast or amp != "none"
            ]
            if mode == "infer" and args.onnx:
                out.append({**base, "impl": "onnx"})
    return out


def case_groups(args: argparse.Namespace) -> list[list[dict]]:
    """The cases whose subprocesses live side by side and alternate their steps: those of one
    net and mode, or each case alone with ``--one-at-a-time`` (one process's memory at once)."""
    if args.one_at_a_time:
        return [[case] for case in cases(args)]
    net_and_mode = operator.itemgetter("depth", "mode")
    return [list(group) for _, group in itertools.groupby(cases(args), key=net_and_mode)]


class CaseError(Exception):
    """A case that cannot run here; its row gives the reason."""


def serve(case: dict, args: argparse.Namespace) -> None:
    """A case's subprocess: prepare and warm up, then time one step for each ``step`` line
    on stdin and print the row at ``done``. Messages are JSON lines on stdout."""
    device = torch.device(args.device)
    with kept_cpu_memory(args.keep_memory, device.type):
        serve_steps(case, args, device)


def serve_steps(case: dict, args: argparse.Namespace, device: torch.device) -> None:
    try:
        step, finish = prepare_case(case, args)
    except CaseError as err:
        print(json.dumps({**case, "variant": variant(case), "error": str(err)}), flush=True)
        return
    time_steps(step, device, args.warmup, 0)
    print(json.dumps({"ready": True}), flush=True)
    times: list[float] = []
    for line in sys.stdin:
        if line.strip() != "step":
            break
        times += time_steps(step, device, 0, 1)
        print(json.dumps({"time": times[-1]}), flush=True)
    print(json.dumps(finish(times)), flush=True)


class Worker:
    """One case in a fresh subprocess of this script (its own peak memory), stepped from
    here so that the cases of one net and mode alternate step by step: the drift of a
    shared machine then hits them alike."""

    def __init__(self, case: dict) -> None:
        self.case = case
        self.row: dict | None = None
        self.log = tempfile.TemporaryFile("w+")  # noqa: SIM115 (the subprocess's life; closed in finish)
        cmd = [sys.executable, __file__, *sys.argv[1:], "--case", json.dumps(case)]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True
        )
        self._receive()

    def _receive(self) -> None:
        """Read the subprocess's next message; other lines it prints are passed on."""
        for line in self.proc.stdout:
            if line.startswith("{"):
                message = json.loads(line)
                if "ready" not in message and "time" not in message:
                    self.row = message
                return
            sys.stderr.write(line)
        self.proc.wait()
        self.log.seek(0)
        err = self.log.read()
        sys.stderr.write(err[-3000:])
        last = (err.strip().splitlines() or ["no output"])[-1]
        error = f"exit {self.proc.returncode}: {last}"
        self.row = {**self.case, "variant": variant(self.case), "error": error}

    def _send(self, command: str) -> None:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        self._receive()

    def step(self) -> None:
        if self.row is None:
            self._send("step")

    def finish(self) -> dict:
        if self.row is None:
            self._send("done")
        self.proc.wait()
        self.log.close()
        return self.row


def add_ratios(rows: list[dict], peaks: dict[str, float]) -> None:
    """Speed relative to the reference row of the same case, and FLOP rate against the peak."""
    for row in rows:
        if "error" in row:
            continue
        ref = next(
            (
                r
                for r in rows
                if r["impl"] == "reference"
                and r["depth"] == row["depth"]
                and r["mode"] == row["mode"]
                and "error" not in r
            ),
            None,
        )
        row["vs_reference"] = row["images_per_s"] / ref["images_per_s"] if ref else None
        flops = row.get("flops_per_image") or (ref or {}).get("flops_per_image")
        row["flop_rate"] = flops * row["images_per_s"] if flops else None
        peak = peaks.get(row["amp"])
        row["of_matmul_peak"] = row["flop_rate"] / peak if peak and row["flop_rate"] else None


FP32_TARGETS = {"cpu": {"train": 1.3, "infer": 1.2}, "cuda": {"train": 1.5, "infer": 1.2}}
FAST_INFER_TARGET = 2.0


def target_lines(rows: list[dict], device_type: str) -> list[str]:
    """The speed targets of cenfusion against the reference (fp32 training, with peak memory
    no higher; fp32 inference; inference with the fastest fast path or onnxruntime, where
    the run has one), one line per net."""

    def verdict(ratio: float, target: float) -> str:
        return f"{ratio:.2f}x (target {target}x: {'met' if ratio >= target else 'not met'})"

    lines = []
    for depth in sorted({r["depth"] for r in rows}):
        done = [r for r in rows if r["depth"] == depth and r.get("vs_reference") is not None]
        found = {(r["mode"], r["impl"], r["variant"]): r for r in done}
        parts = []
        ours, ref = (
            found.get(("train", "cenfusion", "fp32")),
            found.get(("train", "reference", "fp32")),
        )
        if ours and ref:
            memory = "no higher" if ours["peak_mib"] <= ref["peak_mib"] else "higher"
            parts.append(
                f"training fp32 {verdict(ours['vs_reference'], FP32_TARGETS[device_type]['train'])}, "
                f"peak memory {ours['peak_mib']:.0f} MiB against {ref['peak_mib']:.0f} ({memory})"
            )
        ours = found.get(("infer", "cenfusion", "fp32"))
        if ours:
            target = FP32_TARGETS[device_type]["infer"]
            parts.append(f"inference fp32 {verdict(ours['vs_reference'], target)}")
        fast = [r for r in done if r["mode"] == "infer" and r["variant"] != "fp32"]
        if fast:
            best = max(fast, key=lambda r: r["vs_reference"])
            parts.append(
                f"fastest inference {best['variant']} "
                f"{verdict(best['vs_reference'], FAST_INFER_TARGET)}"
            )
        if parts:
            lines.append(f"- R{depth} targets: " + "; ".join(parts))
    return lines


def table(rows: list[dict], args: argparse.Namespace) -> str:
    def num(value, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    sizes = {
        "infer": f"{args.infer_batch}x{args.infer_size[0]}x{args.infer_size[1]}",
        "train": f"{args.train_batch}x{args.train_size[0]}x{args.train_size[1]}",
    }
    lines = [
        (
            "| net | case | impl | variant | median s | images/s | x reference | peak MiB "
            "| GFLOP/image | GFLOP/s | of matmul peak |"
        ),
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        head = f"| R{r['depth']} | {r['mode']} {sizes[r['mode']]} | {r['impl']} | {r['variant']} |"
        if "error" in r:
            lines.append(f"{head} {r['error']} |||||||")
            continue
        flops = r.get("flops_per_image")
        lines.append(
            f"{head} {r['median_s']:.3f} | {r['images_per_s']:.2f} | "
            f"{num(r['vs_reference'], '.2f')} | {r['peak_mib']:.0f} | "
            f"{num(flops and flops / 1e9, '.1f')} | {num(r['flop_rate'] and r['flop_rate'] / 1e9, '.1f')} | "
            f"{num(r['of_matmul_peak'] and 100 * r['of_matmul_peak'], '.1f')}% |"
        )
    return "\n".join(lines)


def machine(device: torch.device, keep_memory: bool) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    heap = "freed memory kept" if keep_memory else "glibc's default heap"
    return f"{name}, {torch.get_num_threads()} threads, {heap}"


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.case:
        serve(json.loads(args.case), args)
        return
    device = torch.device(args.device)
    checks = {depth: check_same(depth, args, device) for depth in args.depths}
    for depth, diff in checks.items():
        print(
            f"R{depth}: cenfusion == reference (eval and train), max relative diff {diff:.1e}",
            file=sys.stderr,
        )
    peaks = {amp: matmul_peak(device, DTYPES[amp]) for amp in {"none", *args.amp}}
    if device.type == "cuda":
        torch.cuda.empty_cache()
    rows = []
    for group in case_groups(args):
        workers = [Worker(case) for case in group]
        for _ in range(args.repeats):
            for worker in workers:
                worker.step()
        for worker in workers:
            rows.append(worker.finish())
            r, case = rows[-1], worker.case
            done = r.get("error") or f"{r['median_s']:.3f} s, {r['images_per_s']:.2f} images/s"
            print(
                f"R{case['depth']} {case['mode']} {case['impl']} {r['variant']}: {done}",
                file=sys.stderr,
            )
    add_ratios(rows, peaks)
    meta = {
        "machine": machine(device, args.keep_memory),
        "device": args.device,
        "torch": torch.__version__,
        "matmul_peak_flops": peaks,
        "max_relative_diff": checks,
        "args": vars(args),
    }
    print(
        f"\n{meta['machine']}, torch {torch.__version__}; matmul peak "
        + ", ".join(
            f"{k if k != 'none' else 'fp32'} {v / 1e9:.0f} GFLOP/s" for k, v in peaks.items()
        )
    )
    print(table(rows, args))
    for line in target_lines(rows, device.type):
        print(line)
    for r in rows:
        if r.get("note"):
            print(f"- R{r['depth']} {r['mode']} {r['variant']}: {r['note']}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"meta": meta, "rows": rows}, out, indent=1)
    if args.profile:
        write_profiles(rows, args.profile)


def write_profiles(rows: list[dict], path: str) -> None:
    with open(path, "w") as out:
        for r in rows:
            if "table" not in r:
                continue
            kernels = ""
            if r["kernels"] is not None:
                busy = r["device_busy_ms"]
                kernels = f", {r['kernels']} device kernels, device busy {busy:.1f} ms"
            out.write(f"## R{r['depth']} {r['mode']} {r['impl']} {r['variant']}{kernels}\n\n")
            out.write(r["table"] + "\n\n")


if __name__ == "__main__":
    main()
