#!/usr/bin/env bash
# GPU check, from the repository root on a CUDA machine, in under 8 minutes:
#   (b) a short CEN R101 training at 480x480 with AMP (random data, 20 steps),
#   (c) benchmarks/seg_speed.py --device cuda, fp32 and AMP rows for R50 and R101 ($DEPTHS),
#   (d) benchmarks/bench_fusion.py --device cuda (the fusion microbenchmark, also at a tiny size),
#   (a) the test suite (python -m pytest -x -q; it mostly runs on the CPU),
# then prints the benchmark table last. (b) and (c) run first so that a slow test suite,
# which gets the time left, cannot starve them. Logs and JSON go to ${OUT:-/tmp}.
#
#   bash benchmarks/gpu_check.sh
set -u
OUT=${OUT:-/tmp}
mkdir -p "$OUT"
BUDGET=${BUDGET:-470}
export PYTHONUNBUFFERED=1 CEN_CACHE=${CEN_CACHE:-/tmp/cen_cache}

# Python: the project's venv (made by `make` if absent); without network, the system python3.
if [ ! -x .venv/bin/python ]; then
    PIP_DEFAULT_TIMEOUT=5 PIP_RETRIES=0 timeout 90 make .venv/bin/cen >"$OUT/venv.log" 2>&1 ||
        echo "make .venv/bin/cen failed (see $OUT/venv.log)"
fi
PY=.venv/bin/python
if ! $PY -c "import torch, timm, cenfusion" >/dev/null 2>&1; then
    PY=python3
    export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
    echo "using $(command -v python3) with PYTHONPATH=src (no working .venv)"
fi
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))" ||
    { echo "no CUDA device visible to torch"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

echo "== (b) CEN R101, 480x480, bf16 autocast, 20 steps"
timeout 150 $PY - <<'EOF' 2>&1 | tee "$OUT/train_r101.log"
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

echo "== (c) seg_speed.py --device cuda (table printed at the end)"
timeout 300 $PY benchmarks/seg_speed.py --device cuda --depths ${DEPTHS:-50 101} \
    --amp bf16 fp16 --channels-last --warmup 3 --repeats 10 --json "$OUT/seg_speed.json" \
    >"$OUT/seg_speed.md" 2>"$OUT/seg_speed.log"
echo "benchmark exit: $?"
tail -n 20 "$OUT/seg_speed.log"

echo "== (d) bench_fusion.py --device cuda: stacked norm + exchange against the loop, M = 2, 3, 4"
timeout 60 $PY benchmarks/bench_fusion.py --device cuda --skip-model 2>&1 | tee "$OUT/fusion.md"
echo "-- the same at a tiny size, where only host time counts"
timeout 40 $PY benchmarks/bench_fusion.py --device cuda --skip-model --batch 1 --channels 64 \
    --hw 2 --repeats 300 2>&1 | tee -a "$OUT/fusion.md"

LEFT=$((BUDGET - SECONDS))
echo "== (a) test suite (${LEFT} s left)"
XDIST=""
$PY -c "import xdist" >/dev/null 2>&1 && XDIST="-n 8"
if [ "$LEFT" -gt 30 ]; then
    timeout "$LEFT" $PY -m pytest -x -q $XDIST -p no:cacheprovider >"$OUT/pytest.log" 2>&1
    echo "pytest exit: $? (124: stopped at the time limit)"
    tail -n 15 "$OUT/pytest.log"
else
    echo "no time left for the test suite"
fi

echo "== benchmark table (${SECONDS} s in all)"
cat "$OUT/seg_speed.md"
