#!/usr/bin/env bash
# GPU check, from the repository root on a CUDA machine, in under 8 minutes; the most
# telling parts first:
#   (b) a short CEN R101 training at 480x480 with AMP (random data, 20 steps),
#   (c) cen bench, R101, eager: the per-modality reference (fp32) beside cenfusion in fp32
#       and bf16 + channels-last, inference at 1x480x640 and a training step at 4x480x480,
#       each step profiled (device kernels, device busy time, busiest operators) and set
#       against its roofline floor; one call per mode, so that one that runs out of time
#       leaves the other's table,
#   (f) the same cenfusion bf16 rows compiled, then (time allowing) in CUDA graphs
#       (--compile-mode reduce-overhead), profiled too,
#   (e) the CLI end to end on CUDA, embedded data: `seg train` (fp16 + GradScaler,
#       channels-last), `seg eval` of that model in fp32, fp16, bf16 and compiled bf16
#       (the ensemble mIoU of each precision), `seg train` under torchrun (NCCL, one
#       process), `i2i train` with AMP,
#   (g) (time allowing) cen bench --task i2i: the U-Net and PatchGAN beside their
#       per-modality reference, inference, a pix2pix step and FID scoring, fp32 and bf16,
#   (d) benchmarks/bench_fusion.py --device cuda (the fusion microbenchmark, also at a tiny size),
#   (a) the test suite: the CUDA-parametrised tests first (fusion, fast paths, compiled and
#       frozen networks, CUDA graphs, no waits for the device in a step or a score), then
#       the rest with the time left ($BUDGET seconds in all, default 470),
# then prints the bench tables last. Logs, profiles and JSON go to ${OUT:-/tmp}.
#
#   bash benchmarks/gpu_check.sh
set -u
OUT=${OUT:-/tmp}
mkdir -p "$OUT"
BUDGET=${BUDGET:-470}
RUNS=$(mktemp -d)
export PYTHONUNBUFFERED=1 CEN_CACHE=${CEN_CACHE:-/tmp/cen_cache}

# Python: the project's venv if it works; else a python3 that already has torch and timm
# (GPU images), with PYTHONPATH=src; else make the venv.
PY=.venv/bin/python
if ! $PY -c "import torch, timm, cenfusion" >/dev/null 2>&1; then
    if python3 -c "import torch, timm" >/dev/null 2>&1; then
        PY=python3
        export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
        echo "using $(command -v python3) with PYTHONPATH=src (no working .venv)"
    else
        PIP_DEFAULT_TIMEOUT=5 PIP_RETRIES=0 timeout 90 make .venv/bin/cen >"$OUT/venv.log" 2>&1 ||
            echo "make .venv/bin/cen failed (see $OUT/venv.log)"
    fi
fi
CEN="$PY -m cenfusion.cli"
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))" ||
    { echo "no CUDA device visible to torch"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

echo "== (b) CEN R101, 480x480, bf16 autocast, 20 steps"
timeout 120 $PY - <<'EOF' 2>&1 | tee "$OUT/train.log"
import math, time
import torch
import torch.nn.functional as F
import cenfusion

torch.backends.cudnn.benchmark = True
model = cenfusion.create_cen_refinenet(depth=101, num_classes=40, pretrained=None).cuda().train()
opt = torch.optim.SGD(
    [{"params": model.encoder_parameters(), "lr": 5e-4},
     {"params": model.decoder_parameters(), "lr": 3e-3}], momentum=0.9, weight_decay=1e-5)
batch = 4
xs = [torch.randn(batch, 3, 480, 480, device="cuda") for _ in range(2)]
target = torch.randint(0, 40, (batch, 120, 120), device="cuda")
times, losses = [], []
for step in range(20):
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        outs = model(xs)
        loss = sum(F.cross_entropy(o.float(), target) for o in outs)
        loss = loss + cenfusion.sparsity_penalty(model, 2e-4)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    torch.cuda.synchronize()
    times.append(time.perf_counter() - start)
    losses.append(loss.item())
steady = sorted(times[5:])[len(times[5:]) // 2]
print(f"first step {times[0]:.2f} s, median step {steady * 1e3:.0f} ms "
      f"({batch / steady:.1f} images/s), peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}, all finite: {all(map(math.isfinite, losses))}")
assert all(map(math.isfinite, losses)), "non-finite loss"
EOF
echo "training exit: ${PIPESTATUS[0]}"

# One cen bench call per mode, so that a call that runs out of time leaves the other's table.
R101=(--device cuda --enc 101 --train-batch 4 --train-size 480 480 --channels-last)
bench() { # NAME SECONDS MODE FLAGS...
    local name=$1 limit=$2 mode=$3
    shift 3
    timeout "$limit" $CEN bench "${R101[@]}" --modes "$mode" "$@" \
        --json "$OUT/bench_${name}_$mode.json" --profile "$OUT/profile_${name}_$mode.md" 2>&1 |
        tee -a "$OUT/cen_bench.md"
    echo "cen bench ($name, $mode) exit: ${PIPESTATUS[0]}"
}
: >"$OUT/cen_bench.md"

echo "== (c) cen bench --device cuda, eager: reference and cenfusion, profiled"
bench eager 100 infer --precisions fp32 bf16 --warmup 5 --runs 10
bench eager 150 train --precisions fp32 bf16 --warmup 5 --runs 10

echo "== (f) cen bench --compile --device cuda: the first compiled rows on a GPU"
bench compiled 120 infer --precisions bf16 --compile --no-reference --warmup 5 --runs 10
bench compiled 180 train --precisions bf16 --compile --no-reference --warmup 5 --runs 10
# The CUDA graphs run only with time left in $BUDGET for them (the suite gets the rest).
if [ $((BUDGET - SECONDS)) -gt 250 ]; then
    echo "-- the same in CUDA graphs (reduce-overhead); a skipped capture warns"
    GRAPHS=(--precisions bf16 --compile --compile-mode reduce-overhead --no-reference)
    bench graphs 100 infer "${GRAPHS[@]}" --warmup 5 --runs 20
    bench graphs 150 train "${GRAPHS[@]}" --warmup 5 --runs 20
else
    echo "-- reduce-overhead rows skipped: $((BUDGET - SECONDS)) s left"
fi

echo "== (e) the CLI on CUDA, embedded data"
SEG=(--epochs 2 --lr-enc 5e-4 --lr-dec 3e-3 --val-every 1 --quiet --no-plots --runs "$RUNS")
{
    # The synthetic preset's whole schedule (the demo's CEN, 1000 steps): a trained model
    # whose ensemble mIoU shows what each precision costs.
    timeout 120 $CEN seg train --device cuda --amp --channels-last --val-every 20 --quiet \
        --no-plots --runs "$RUNS" --exp amp | tail -n 6
    echo "seg train --amp --channels-last exit: ${PIPESTATUS[0]}"
    echo "-- ensemble mIoU of that model on the embedded validation set, by precision"
    for flags in "--no-amp --no-channels-last" "--amp" "--amp --amp-dtype bfloat16" \
        "--amp --amp-dtype bfloat16 --compile"; do
        echo "seg eval $flags: $(timeout 90 $CEN seg eval --device cuda $flags \
            --resume "$RUNS/amp/best.pth" 2>&1 | grep -E '^ensemble|rror' | head -n 2)"
    done
    timeout 60 $PY -m torch.distributed.run --standalone --nproc_per_node 1 -m cenfusion.cli \
        seg train --device cuda "${SEG[@]}" --epochs 1 --exp ddp | tail -n 4
    echo "torchrun seg train exit: ${PIPESTATUS[0]}"
    timeout 60 $CEN i2i train --device cuda --amp --epochs 1 --val-every 1 --no-fid --quiet \
        --no-plots --runs "$RUNS" --exp i2i | tail -n 4
    echo "i2i train --amp exit: ${PIPESTATUS[0]}"
} 2>&1 | tee -a "$OUT/train.log"

echo "== (g) cen bench --task i2i: U-Net inference, pix2pix step, FID scoring; reference first"
if [ $((BUDGET - SECONDS)) -gt 150 ]; then
    timeout 120 $CEN bench --device cuda --task i2i --precisions fp32 bf16 \
        --modes infer train fid --warmup 3 --runs 10 --json "$OUT/cen_bench_i2i.json" 2>&1 |
        tee -a "$OUT/cen_bench.md"
    echo "cen bench --task i2i exit: ${PIPESTATUS[0]}"
else
    echo "skipped: $((BUDGET - SECONDS)) s left"
fi

echo "== (d) bench_fusion.py --device cuda: stacked norm + exchange against the loop, M = 2, 3, 4"
timeout 60 $PY benchmarks/bench_fusion.py --device cuda --skip-model 2>&1 | tee "$OUT/fusion.md"
echo "-- the same at a tiny size, where only host time counts"
timeout 40 $PY benchmarks/bench_fusion.py --device cuda --skip-model --batch 1 --channels 64 \
    --hw 2 --repeats 300 2>&1 | tee -a "$OUT/fusion.md"

echo "== (a) test suite: the CUDA-parametrised tests"
FIRST=(tests/test_fusion.py tests/test_fusion_fastpath.py)
# The project's addopts spread tests over CPU workers (pytest-xdist), which the GPU image may
# lack; here the CUDA tests run in one process, the rest on 8 workers where xdist is there.
timeout 150 $PY -m pytest -q -o addopts= -p no:cacheprovider "${FIRST[@]}" \
    tests/test_refinenet.py::test_a_frozen_compiled_cen_block_computes_the_same_function \
    tests/test_refinenet.py::test_a_training_step_and_inference_never_wait_for_the_device \
    tests/test_metrics_segmentation.py::test_scoring_a_batch_of_logits_never_waits_for_the_device \
    2>&1 | tail -n 8
LEFT=$((BUDGET - SECONDS))
echo "== (a) the rest of the test suite (${LEFT} s left)"
XDIST=""
$PY -c "import xdist" >/dev/null 2>&1 && XDIST="-n 8"
if [ "$LEFT" -gt 30 ]; then
    timeout "$LEFT" $PY -m pytest -q -o addopts=--doctest-modules $XDIST -p no:cacheprovider \
        ${FIRST[@]/#/--ignore=} \
        >"$OUT/pytest.log" 2>&1
    echo "pytest exit: $? (124: stopped at the time limit)"
    tail -n 15 "$OUT/pytest.log"
else
    echo "no time left for the test suite"
fi

echo "== cen bench tables (${SECONDS} s in all)"
cat "$OUT/cen_bench.md"
