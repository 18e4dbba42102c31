#!/usr/bin/env bash
# The GPU suite (issue 18): every GPU figure the project lacks, in one run of at most 8 min.
#
#   bash benchmarks/gpu_suite.sh [OUT_DIR]     # OUT_DIR: default $OUT if set, else out/gpu_suite
#
# Steps (each under its own `timeout`, logging to OUT_DIR/<step>.log):
#   a. environment: nvidia-smi, python/torch/torchvision/onnxruntime/faiss/grpcio versions,
#      ORT providers; `pip install --no-deps --no-build-isolation -e .` only when `import
#      visearch` fails outside the repo (PYTHONPATH=repo is set anyway, as a safety net);
#   b. model throughput (benchmarks.bench_models): detector and embedder images/s at batch 1
#      and 32, fp32/fp16, torch/ONNX Runtime, on cuda;
#   c. 1M-vector index search (benchmarks.bench_index, flat + ivf, with its torch matmul+topk
#      GPU row); without faiss, a torch matmul+topk row alone;
#   d. end-to-end gRPC QPS and p50/p99 at concurrency 1, 16, 64 (benchmarks.latency), ONNX
#      Runtime then torch. Its index: $INDEX_ROOT and world $WORLD when given, else a
#      100-SKU world and a fast rebuild made here (few steps: throughput, not accuracy).
#   e. (only with GPU_TRAIN=1; adds up to TRAIN_SECONDS, 300 by default, to the suite's
#      budget) the `gpu` profile's embedder training on a TRAIN_SKUS-SKU world (1000; seed 53,
#      not tuned on), beside the pre-issue-22 cpu-small recipe ("today"), true-box Recall@1
#      and training minutes (benchmarks.bench_catalog_scale --profile gpu, issue 22).
# Then OUT_DIR/summary.md: date, device, each step's status and every table.
# A missing package (faiss, onnxruntime, grpcio, onnx, onnxscript...) or a failed step is
# recorded and the suite goes on. `set -e` is deliberately off.
#
# Environment knobs: INDEX_ROOT, WORLD (both or neither), PYTHON (default python, else
# python3), DEVICE (default cuda when torch sees one, else cpu: a CPU dry run), WORK_DIR
# (out/gpu_suite_work: world, index, ONNX files; a re-run reuses them), SUITE_SECONDS (450),
# N_VECTORS (1000000), SKUS (100), CELL_SECONDS (2), LAT_DURATION (10).
#
# Through the device tool (repo root is the working directory there; results come back from
# $OUT). Carry the ImageNet weights (ignored by git) and, optionally, a prebuilt index:
#   run(command="bash benchmarks/gpu_suite.sh", carry=["weights"], timeout_s=540)
#   run(command="INDEX_ROOT=out/gpu/indexes WORLD=out/gpu/world bash benchmarks/gpu_suite.sh",
#       carry=["weights", "out/gpu"], timeout_s=540)        # (carry is 64 MiB in all)
# CPU dry run here: DEVICE=cpu N_VECTORS=20000 SKUS=20 LAT_DURATION=2 CELL_SECONDS=0.5 \
#   bash benchmarks/gpu_suite.sh /tmp/gpu_suite_dry
#
# Recording: copy OUT_DIR/summary.md's tables into benchmarks/RESULTS.md under a new section
# "## GPU suite (issue 18) — <date>", naming the device line from the summary (GPU name,
# driver, torch/ORT/faiss versions) and this command; replace the "GPU: no GPU machine"
# caveat at the top of RESULTS.md with a pointer to it. Keep the steps that failed and why.

set -u

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 1
OUT_DIR="${1:-${OUT:-out/gpu_suite}}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
# Bulky files (world, index, exported models) stay out of OUT_DIR, which the device tool
# copies back: only logs, tables and JSON reports go there.
WORK_DIR="${WORK_DIR:-$REPO/out/gpu_suite_work}"
mkdir -p "$WORK_DIR"
SUMMARY="$OUT_DIR/summary.md"
STATUS="$OUT_DIR/status.txt"
: > "$STATUS"

if [ -z "${PYTHON:-}" ]; then
  if command -v python >/dev/null 2>&1; then PYTHON=python; else PYTHON=python3; fi
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

SUITE_SECONDS="${SUITE_SECONDS:-450}"  # 8 min less slack for kill-after and the summary
GPU_TRAIN="${GPU_TRAIN:-0}"
TRAIN_SECONDS="${TRAIN_SECONDS:-300}"
TRAIN_SKUS="${TRAIN_SKUS:-1000}"
if [ "$GPU_TRAIN" = 1 ]; then SUITE_SECONDS=$((SUITE_SECONDS + TRAIN_SECONDS)); fi
N_VECTORS="${N_VECTORS:-1000000}"
SKUS="${SKUS:-100}"
CELL_SECONDS="${CELL_SECONDS:-2}"
LAT_DURATION="${LAT_DURATION:-10}"
START=$(date +%s)
END=$((START + SUITE_SECONDS))
export REPO OUT_DIR WORK_DIR PYTHON N_VECTORS SKUS CELL_SECONDS LAT_DURATION START END

log() { echo "[gpu_suite $(date +%H:%M:%S) +$(( $(date +%s) - START ))s] $*"; }

# budget CAP RESERVE: seconds this step may take: at most CAP, and leaving RESERVE for the
# steps after it (so the whole suite stays within SUITE_SECONDS).
budget() {
  local left=$((END - $(date +%s) - $2))
  if [ "$left" -lt "$1" ]; then echo "$left"; else echo "$1"; fi
}

# step NAME CAP RESERVE CMD...: run CMD under timeout into OUT_DIR/NAME.log; records status.
step() {
  local name="$1" cap="$2" reserve="$3"; shift 3
  local t rc t0
  t=$(budget "$cap" "$reserve")
  if [ "$t" -lt 10 ]; then
    log "$name: skipped (out of time: ${t}s left for it)"
    echo "$name: skipped (out of time)" >> "$STATUS"
    return 99
  fi
  log "$name: up to ${t}s -> $OUT_DIR/$name.log"
  t0=$(date +%s)
  # `timeout` execs a program: shell functions (exported below) run through `bash -c`.
  STEP_SECONDS="$t" timeout --kill-after=10 "$t" bash -c '"$@"' step "$@" \
    > "$OUT_DIR/$name.log" 2>&1
  rc=$?
  local took=$(( $(date +%s) - t0 ))
  if [ "$rc" -eq 0 ]; then
    echo "$name: ok (${took}s)" >> "$STATUS"
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "$name: TIMED OUT after ${t}s" >> "$STATUS"
  else
    echo "$name: failed rc=$rc (${took}s): $(tail -n 1 "$OUT_DIR/$name.log" | cut -c1-200)" \
      >> "$STATUS"
  fi
  log "$name: rc=$rc in ${took}s"
  return "$rc"
}

# ---------------------------------------------------------------- a. environment
env_report() {
  echo "## nvidia-smi"
  nvidia-smi 2>&1 || echo "nvidia-smi: unavailable"
  echo
  echo "## versions"
  "$PYTHON" - <<'EOF'
import importlib
import platform
import sys

print("python", platform.python_version(), sys.executable)
for name in ("torch", "torchvision", "onnxruntime", "onnx", "onnxscript", "faiss", "grpc",
             "numpy", "lmdb", "cv2", "prometheus_client"):
    try:
        mod = importlib.import_module(name)
        print(f"{name} {getattr(mod, '__version__', '?')}")
    except Exception as e:
        print(f"{name} MISSING ({type(e).__name__}: {e})")
try:
    import torch
    print("cuda available", torch.cuda.is_available(), "| torch cuda", torch.version.cuda,
          "| cudnn", torch.backends.cudnn.version())
    if torch.cuda.is_available():
        print("gpu", torch.cuda.get_device_name(0))
except Exception as e:
    print("torch cuda check failed", e)
try:
    import onnxruntime as ort
    print("ort providers", ort.get_available_providers(), "| device", ort.get_device())
except Exception as e:
    print("ort providers: n/a", e)
try:
    import faiss
    print("faiss gpus", faiss.get_num_gpus())
except Exception as e:
    print("faiss gpus: n/a", e)
EOF
  echo
  echo "## visearch install"
  if (cd / && env -u PYTHONPATH "$PYTHON" -c "import visearch" 2>/dev/null); then
    echo "visearch importable"
  else
    echo "visearch not installed: pip install --no-deps --no-build-isolation -e ."
    "$PYTHON" -m pip install --no-deps --no-build-isolation -e . 2>&1 | tail -n 5 \
      || echo "pip install failed; running from PYTHONPATH=$REPO"
  fi
  "$PYTHON" -c "import visearch, index_builder, benchmarks; print('imports ok')"
}

log "OUT_DIR=$OUT_DIR python=$PYTHON budget=${SUITE_SECONDS}s"
export -f budget env_report
step env 60 0 env_report
grep -E "MISSING|unavailable|n/a" "$OUT_DIR/env.log" > "$OUT_DIR/missing.txt" 2>/dev/null

if [ -z "${DEVICE:-}" ]; then
  if "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
      2>/dev/null; then DEVICE=cuda; else DEVICE=cpu; fi
fi
GPU_NAME=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader \
  2>/dev/null | head -n 1)
GPU_NAME="${GPU_NAME:-no GPU (nvidia-smi unavailable)}"
log "device: $DEVICE ($GPU_NAME)"

# Minimum seconds kept for later steps: the two latency runs, and the index build when no
# INDEX_ROOT/WORLD is given.
LAT_RESERVE=110
if [ -n "${INDEX_ROOT:-}" ] && [ -n "${WORLD:-}" ]; then BUILD_RESERVE=0; else BUILD_RESERVE=120; fi

# ---------------------------------------------------------------- b. model throughput
MODEL_ARGS=()
if [ -n "${INDEX_ROOT:-}" ]; then MODEL_ARGS+=(--index-root "$INDEX_ROOT"); fi
step models 150 $((60 + BUILD_RESERVE + LAT_RESERVE)) \
  "$PYTHON" -m benchmarks.bench_models --device "$DEVICE" --batch-sizes 1,32 \
  --dtypes fp32,fp16 --runtimes torch,onnx --seconds "$CELL_SECONDS" \
  --work "$WORK_DIR/models_onnx" --json "$OUT_DIR/bench_models.json" \
  --md "$OUT_DIR/bench_models.md" ${MODEL_ARGS[@]+"${MODEL_ARGS[@]}"}

# ---------------------------------------------------------------- c. index search
index_bench() {
  if "$PYTHON" -c "import faiss" 2>/dev/null; then
    "$PYTHON" -m benchmarks.bench_index --n "$N_VECTORS" --dim 256 --types flat,ivf \
      --graph-rows 0 --queries 1000 --batch1-queries 200 --out "$OUT_DIR/bench_index"
  else
    echo "faiss MISSING: torch matmul+topk only"
    "$PYTHON" - "$N_VECTORS" "$DEVICE" "$OUT_DIR/bench_index.md" <<'EOF'
import sys
import time

import torch

n, dev, out = int(sys.argv[1]), torch.device(sys.argv[2]), sys.argv[3]
g = torch.Generator(device="cpu").manual_seed(0)
xb = torch.nn.functional.normalize(torch.randn(n, 256, generator=g), dim=1).to(dev)
xq = torch.nn.functional.normalize(torch.randn(1000, 256, generator=g), dim=1)
sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
lines = [f"faiss missing: torch matmul+topk only, N={n} d=256, k=10, {dev}", "",
         "| batch | queries/s |", "|---:|---:|"]
for batch, count in ((1, 200), (256, 1000)):
    torch.topk(xq[:batch].to(dev) @ xb.T, 10, dim=1)
    sync()
    t0 = time.perf_counter()
    for s in range(0, count, batch):
        torch.topk(xq[s : s + batch].to(dev) @ xb.T, 10, dim=1)[1].cpu()
    sync()
    lines.append(f"| {batch} | {count / (time.perf_counter() - t0):.1f} |")
print("\n".join(lines))
open(out, "w").write("\n".join(lines) + "\n")
EOF
  fi
}
export DEVICE
export -f index_bench
step index 120 $((BUILD_RESERVE + LAT_RESERVE)) index_bench

# ---------------------------------------------------------------- d. end to end gRPC
make_index() {
  local world="$WORK_DIR/world" root="$WORK_DIR/indexes"
  if [ ! -f "$world/world.json" ]; then
    "$PYTHON" -m index_builder.synth_cli --out "$world" --skus "$SKUS" --seed 0 -q \
      --workers 8 || return 1
  fi
  cat > "$OUT_DIR/fast_rebuild.json" <<'EOF'
{"profile": "cpu-small", "workers": 8,
 "dedup": {"enabled": false}, "clean": {"enabled": false}, "merge": {"enabled": false},
 "detector": {"source": "coco", "epochs": 1, "rounds": 0},
 "scenes": {"query_domain": false},
 "embedder": {"epochs": 1, "steps_per_epoch": 20, "cleaning_steps_per_epoch": 20,
              "patience": null, "budget_minutes": null}}
EOF
  "$PYTHON" -m index_builder.cli rebuild --catalog "$world/catalog.jsonl" --root "$root" \
    --work "$WORK_DIR/rebuild_work" --config "$OUT_DIR/fast_rebuild.json" || return 1
  "$PYTHON" - "$root" <<'EOF'
import json
import sys

from visearch.index import IndexRoot

v = IndexRoot(sys.argv[1]).open()
onnx = v.manifest.get("onnx") or {}
print("version", v.path, "| ONNX embedder", bool(onnx.get("embedder")), "| ONNX detector",
      bool(onnx.get("detector")), "| errors", json.dumps(onnx.get("errors")))
EOF
}

export -f make_index
if [ -n "${INDEX_ROOT:-}" ] && [ -n "${WORLD:-}" ]; then
  LAT_ROOT="$INDEX_ROOT"; LAT_WORLD="$WORLD"
  echo "index: given INDEX_ROOT=$INDEX_ROOT WORLD=$WORLD" >> "$STATUS"
else
  LAT_ROOT="$WORK_DIR/indexes"; LAT_WORLD="$WORK_DIR/world"
  step build_index 150 "$LAT_RESERVE" make_index
fi

latency() {  # latency RUNTIME; seconds per level shrink to fit the step's timeout
  local dur="$LAT_DURATION" fit=$(( (${STEP_SECONDS:-60} - 25) / 3 ))
  if [ "$fit" -lt 2 ]; then fit=2; fi
  if awk -v d="$dur" -v f="$fit" 'BEGIN { exit !(d > f) }'; then dur="$fit"; fi
  "$PYTHON" -m benchmarks.latency --index-root "$LAT_ROOT" --world "$LAT_WORLD" \
    --concurrency 1,16,64 --duration "$dur" --max-requests 100000 --device "$DEVICE" \
    --runtime "$1" --json "$OUT_DIR/latency_$1.json"
}
export LAT_ROOT LAT_WORLD
export -f latency
if [ -f "$LAT_ROOT/CURRENT" ]; then
  step latency_onnx 60 55 latency onnx
  step latency_torch 60 5 latency torch
else
  echo "latency: skipped (no index at $LAT_ROOT)" >> "$STATUS"
fi

# ---------------------------------------------------------------- e. gpu-profile training
gpu_train() {
  local world="$WORK_DIR/world_train_$TRAIN_SKUS"
  if [ ! -f "$world/world.json" ]; then
    "$PYTHON" -m index_builder.synth_cli --out "$world" --skus "$TRAIN_SKUS" --seed 53 \
      --scenes 0 -q --workers 8 || return 1
  fi
  "$PYTHON" -m benchmarks.bench_catalog_scale --world "$world" --profile gpu \
    --recipes today --recipe "gpu_budget={\"budget_minutes\": $((TRAIN_SECONDS / 120))}" \
    --out "$WORK_DIR/train" --json "$OUT_DIR/gpu_train.jsonl" --no-latency
}
export TRAIN_SKUS TRAIN_SECONDS
export -f gpu_train
if [ "$GPU_TRAIN" = 1 ]; then
  step gpu_train "$TRAIN_SECONDS" 0 gpu_train
fi

# ---------------------------------------------------------------- summary
{
  echo "# GPU suite — $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "Device: $DEVICE — $GPU_NAME; $(grep -E '^(torch|onnxruntime|faiss) ' "$OUT_DIR/env.log" \
    2>/dev/null | paste -sd ';' - | sed 's/;/; /g')"
  echo "Command: bash benchmarks/gpu_suite.sh; total $(( $(date +%s) - START )) s."
  echo
  echo "## Steps"
  echo
  sed 's/^/- /' "$STATUS"
  if [ -s "$OUT_DIR/missing.txt" ]; then
    echo
    echo "## Missing on this machine"
    echo
    sed 's/^/- /' "$OUT_DIR/missing.txt"
  fi
  echo
  echo "## Models (benchmarks.bench_models)"
  echo
  cat "$OUT_DIR/bench_models.md" 2>/dev/null || {
    echo "(no table; the end of models.log:)"; echo '```'; tail -n 25 "$OUT_DIR/models.log"
    echo '```'; }
  echo
  echo "## Index search (benchmarks.bench_index, N=$N_VECTORS, d=256)"
  echo
  cat "$OUT_DIR/bench_index.md" 2>/dev/null || {
    echo "(no table; the end of index.log:)"; echo '```'; tail -n 25 "$OUT_DIR/index.log"
    echo '```'; }
  echo
  if [ "$GPU_TRAIN" = 1 ]; then
    echo "## gpu-profile embedder training (benchmarks.bench_catalog_scale, $TRAIN_SKUS SKUs)"
    echo
    sed -n '/^| recipe/,$p' "$OUT_DIR/gpu_train.log" 2>/dev/null | head -n 8
    echo
  fi
  echo "## End to end gRPC (benchmarks.latency, index $LAT_ROOT)"
  if [ -f "$OUT_DIR/build_index.log" ]; then
    echo
    grep -E "^version " "$OUT_DIR/build_index.log" || echo "(index build: see build_index.log)"
  fi
  for rt in onnx torch; do
    echo
    echo "### --runtime $rt"
    echo
    echo '```'
    if grep -q '^machine:' "$OUT_DIR/latency_$rt.log" 2>/dev/null; then
      sed -n '/^machine:/,$p' "$OUT_DIR/latency_$rt.log" | head -n 20
    else
      tail -n 15 "$OUT_DIR/latency_$rt.log" 2>/dev/null || echo "(did not run)"
    fi
    echo '```'
  done
} > "$SUMMARY"
log "wrote $SUMMARY"
cat "$SUMMARY"
