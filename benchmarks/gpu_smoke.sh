#!/usr/bin/env bash
# The first thing to run on a GPU machine (under 5 minutes on one H100-class GPU); paste its output
# into BENCHMARKS.md.  It prints the GPU and library versions, embeds flowers12 on the GPU engine
# (batch 256, 16 workers, under `ulimit -n 1024`) and on the CPU, compares the two caches' features
# (cosine min/mean: flowers12 is all 4:2:0 JPEG, which nvJPEG upsamples by nearest neighbour) and
# fingerprints, probes both with every head, runs a one-epoch compare on hymenoptera on CUDA, and
# the embedding and heads benchmarks at a size that fits the 5 minutes; then the heads scale
# benchmark (1M x 1,280 x 1,000 streamed, and the 100k in-memory comparison), which may take longer.
#
#   bash benchmarks/gpu_smoke.sh              # on a GPU machine (PYTHON=..., DATA=... to override)
#   bash benchmarks/gpu_smoke.sh --dry-run    # anywhere: checks every command's options, runs the
#                                             # CPU steps on a tiny generated folder, and skips each
#                                             # CUDA step with one line (run by `make test`)
set -euo pipefail

DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$(command -v python3 || command -v python)}
DATA=${DATA:-$ROOT/../shared/data}
OUT=$(mktemp -d "${TMPDIR:-/tmp}/featx-gpu-smoke.XXXXXX")
trap 'rm -rf "$OUT"' EXIT
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
FEATX=("$PY" -m featx.cli)

if [ $DRY = 1 ]; then
  # A tiny folder and network: the CPU steps really run, in seconds.
  "$PY" -c "import sys; sys.path.insert(0, 'tests'); from pathlib import Path; from conftest import write_image_folder; \
write_image_folder(Path('$OUT/data/flowers12'), splits=('train', 'test'), per_class=4); \
write_image_folder(Path('$OUT/data/hymenoptera_data'), per_class=4)"
  DATA=$OUT/data
  NET=(--backbone tiny_cnn --weights random)
else
  NET=()
fi

# featx_step cpu|cuda COMMAND TARGET|- OPTION...: a dry run checks the options (`featx config`
# parses them like the command) and runs only the CPU steps.
featx_step() {
  local kind=$1 cmd=$2 target=()
  [ "$3" != - ] && target=("$3")
  shift 3
  if [ $DRY = 1 ]; then
    "${FEATX[@]}" config "$cmd" "$@" >/dev/null || { echo "FAILED: options of featx $cmd $*"; exit 1; }
    if [ "$kind" = cuda ]; then
      echo "skip (dry run, no GPU): featx $cmd ${target[*]} $*"
      return 0
    fi
  fi
  echo "\$ featx $cmd ${target[*]} $*"
  "${FEATX[@]}" "$cmd" "${target[@]}" "$@"
}

# bench_step SCRIPT OPTION...: a dry run checks that the script knows every option, then skips it.
bench_step() {
  local script=$1
  shift
  if [ $DRY = 1 ]; then
    local help opt
    help=$("$PY" "$script" --help)
    for opt in "$@"; do
      case $opt in --*) grep -q -- "$opt" <<<"$help" || { echo "FAILED: $script has no option $opt"; exit 1; } ;; esac
    done
    echo "skip (dry run, no GPU): $script $*"
    return 0
  fi
  echo "\$ $script $*"
  "$PY" "$script" "$@"
}

echo "== machine"
if [ $DRY = 1 ]; then
  echo "skip (dry run, no GPU): nvidia-smi -L"
else
  nvidia-smi -L
fi
"$PY" -c "import torch, torchvision; c = torch.cuda.is_available(); \
print('torch', torch.__version__, '| torchvision', torchvision.__version__, '| CUDA', torch.version.cuda, \
'| bf16', c and torch.cuda.is_bf16_supported(), '| GPUs', torch.cuda.device_count())"
nproc

echo "== embed flowers12: GPU engine (batch 256, 16 workers, ulimit -n 1024), then the CPU"
ulimit -n 1024
featx_step cuda embed "$DATA/flowers12" "${NET[@]}" --device cuda --engine gpu --batch-size 256 --workers 16 \
  --cache-dir "$OUT/gpu" --quiet
featx_step cpu embed "$DATA/flowers12" "${NET[@]}" --device cpu --cache-dir "$OUT/cpu" --quiet

echo "== GPU vs CPU features and fingerprints"
compare() {
  "$PY" - "$1" "$2" <<'EOF'
import glob, json, sys
import numpy as np
from featx.cache.store import FeatureCache
a, b = (FeatureCache(sorted(glob.glob(f"{d}/*.h5"))[0]) for d in sys.argv[1:3])
keys = sorted(set(a.keys()) & set(b.keys()))
ra, rb = ({k: i for i, k in enumerate(c.keys())} for c in (a, b))
Xa, Xb = a.features().astype(np.float64), b.features().astype(np.float64)
Xa, Xb = Xa[[ra[k] for k in keys]], Xb[[rb[k] for k in keys]]
cos = (Xa * Xb).sum(1) / (np.linalg.norm(Xa, axis=1) * np.linalg.norm(Xb, axis=1))
print(f"{len(keys)} images: cosine min {cos.min():.5f} mean {cos.mean():.5f}")
fa, fb = a.fingerprint_dict, b.fingerprint_dict
print("fingerprints differ in:", json.dumps({k: [fa.get(k), fb.get(k)] for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)}))
print("cache files:", a.path.name, b.path.name)
EOF
}
if [ $DRY = 1 ]; then
  compare "$OUT/cpu" "$OUT/cpu"  # checks the comparison itself
  echo "skip (dry run, no GPU): compare $OUT/gpu with $OUT/cpu"
else
  compare "$OUT/gpu" "$OUT/cpu"
fi

echo "== probe, every head: GPU heads, then the CPU"
featx_step cuda probe - --cache-dir "$OUT/gpu" --device cuda --head all --out-dir "$OUT/probe-gpu" --no-report --quiet
featx_step cpu probe - --cache-dir "$OUT/cpu" --device cpu --head all --out-dir "$OUT/probe-cpu" --no-report --quiet

echo "== compare on hymenoptera: head and full fine-tunes, one epoch, CUDA"
featx_step cuda compare "$DATA/hymenoptera_data" "${NET[@]}" --device cuda --finetune --strategy head,full --epochs 1 \
  --cache-dir "$OUT/hym" --out-dir "$OUT/compare" --no-report

echo "== benchmarks (sizes that fit the 5 minutes)"
bench_step benchmarks/embed_bench.py --device cuda --images 2000 --backbones efficientnet_lite0 --batch-size 256 \
  --rss 0 --seconds 5 --no-cold
bench_step benchmarks/heads_bench.py --device cuda --n 20000 --dim 1280 --classes 100 --skip-sklearn
echo "== the scale benchmark on CUDA (last: the longest step; its figures go beside the CPU rows)"
bench_step benchmarks/heads_scale.py --device cuda --rows 1000000 --dim 1280 --classes 1000 --compare 100000 \
  --folds 2 --dir "$OUT/scale"
echo "== done"
