#!/usr/bin/env bash
# The noise engine on a GPU, in one call: correctness (bench --check) and speed at the issue's settings.
#
#   bash benchmarks/gpu.sh            # results under $OUT (default /tmp/gpu-bench)
#
# Runs `python -m tools.bench` (no Ray needed) for each setting below, most important first, and stops starting new
# ones when BUDGET_S (default 520) seconds are spent, so that it ends inside a 10-minute device call. Writes gpu.txt
# (the device), results.jsonl (one bench JSON object per setting, with "name"), summary.txt and bench.log.
# The device image has no webdataset: carry its wheels in .whl/ (docs/benchmarks.md, "On a GPU").
set -u
OUT=${OUT:-/tmp/gpu-bench}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ! python3 -c "import webdataset" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 3
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; date -u; } > "$OUT/gpu.txt"
deadline=$((SECONDS + ${BUDGET_S:-520}))

run() {  # name, seconds allowed, bench flags...
  local name=$1 limit=$2 left t rc
  shift 2
  left=$((deadline - SECONDS))
  if [ "$left" -lt 45 ]; then echo "$name: not run (time budget spent)" | tee -a "$OUT/summary.txt"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  t=$SECONDS
  echo "== $name: $*" >> "$OUT/bench.log"
  timeout "$limit" python3 -m tools.bench --check --json "$@" > "$OUT/$name.tmp" 2>> "$OUT/bench.log"
  rc=$?
  python3 - "$name" "$OUT/$name.tmp" >> "$OUT/results.jsonl" <<'PY'
import json, sys
try:
    res = json.load(open(sys.argv[2]))
except ValueError:
    sys.exit(0)
print(json.dumps({"name": sys.argv[1], **res}))
PY
  rm -f "$OUT/$name.tmp"
  echo "$name: exit $rc in $((SECONDS - t)) s (0 ok; 1 a check failed or an error, see bench.log; 124 timed out)" \
    | tee -a "$OUT/summary.txt"
}

R18="--surrogate resnet18 --resolution 32 --steps 20"
# The issue's 32-px setting, with a whole round (4 shards x 2,048 images, 10 train steps at batch 512).
run r18-32-b512 200 $R18 --batch-size 512 --iters 5 --round-shards 4 --round-samples 2048
# 224 px from 256-px photos: the stop check and the release resize every image, as with a real corpus.
run r18in-224-b128 200 --surrogate resnet18-imagenet --resolution 224 --steps 20 --batch-size 128 --iters 3 \
  --native-size 256 --round-shards 2 --round-samples 512
# Larger noise batches, with the round training at 512 as protect --noise-batch-size would.
run r18-32-b2048 120 $R18 --batch-size 2048 --iters 3 --train-batch-size 512 --round-shards 2 --round-samples 4096
# CUDA graphs.
run r18-32-b512-cudagraphs 120 $R18 --batch-size 512 --iters 5 --compile-mode reduce-overhead --no-round --no-baseline
# What bf16, channels_last and compile each bring: the plain fp32 eager engine.
run r18-32-b512-fp32-eager 60 $R18 --batch-size 512 --iters 3 --precision fp32 --no-compile --no-channels-last \
  --no-round --no-baseline
