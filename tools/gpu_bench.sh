#!/usr/bin/env bash
# The GPU benchmark: install what this machine lacks (wheels only), then run `python -m mdmf.bench` for CLIP RN50 and
# ViT-B/16 (random weights, real shapes, 224 px) and write each size's JSON and table to $OUT. Each table starts with the
# memory model's predicted peaks; the training rows put the measured peak (torch.cuda.max_memory_allocated) beside the
# predicted one, which is how a GPU checks the memory model.
#
#   OUT=bench_out tools/gpu_bench.sh                                   # on a GPU machine
#   BENCH_SIZES=tiny BENCH_ARGS="--device cpu --repeats 1" tools/gpu_bench.sh   # the same script on a CPU (minutes)
#
# Settings (environment): OUT (default ./bench_out), BENCH_SIZES (default "rn50 vit-b16"), BENCH_ARGS (extra flags,
# default "--checkpoint-row": also time activation checkpointing), BENCH_TIMEOUT (seconds per size, default 240).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_out}
SIZES=${BENCH_SIZES:-rn50 vit-b16}
ARGS=${BENCH_ARGS:---checkpoint-row}
LIMIT=${BENCH_TIMEOUT:-240}
mkdir -p "$OUT"
start=$(date +%s)

# 1. What the machine lacks: import name -> wheel name. Wheels only (no builds); a failure is reported, not fatal.
missing=$(python - <<'EOF'
import importlib.util
need = {'torch': 'torch', 'clip': 'clip-anytorch', 'decord': 'decord', 'av': 'av', 'numpy': 'numpy', 'PIL': 'pillow',
        'tqdm': 'tqdm', 'fastcore': 'fastcore>=1.12,<1.13', 'setuptools': 'setuptools<82'}
print(' '.join(f"'{w}'" for m, w in need.items() if importlib.util.find_spec(m) is None))
EOF
)
if [ -n "$missing" ]; then
  echo "installing: $missing" | tee "$OUT/install.log"
  eval python -m pip install --only-binary=:all: -q "$missing" >> "$OUT/install.log" 2>&1 \
    || echo "pip install failed (offline?): see $OUT/install.log"
fi
python -c "import clip" 2>/dev/null || python -c "import pkg_resources" 2>/dev/null \
  || python -m pip install --only-binary=:all: -q 'setuptools<82' >> "$OUT/install.log" 2>&1 || true

# 2. What the run was on.
{ nvidia-smi 2>&1 || echo "no nvidia-smi"; python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
  'available', torch.cuda.is_available())"; } > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt" | tail -n 1

# 3. One benchmark per size; each writes bench_<size>.json and bench_<size>.txt. The JSON is rewritten after each part
#    and each training row ("complete": false until the end), so a size stopped by the time-out keeps what finished.
status=0
for size in $SIZES; do
  echo "== $size ($(( $(date +%s) - start )) s)"
  timeout "$LIMIT" python -m mdmf.bench --size "$size" $ARGS --out "$OUT/bench_$size.json" 2>&1 \
    | grep -v -e pkg_resources -e 'from pkg_resources' | tee "$OUT/bench_$size.txt"
  rc=${PIPESTATUS[0]}
  [ "$rc" -ne 0 ] && { echo "bench $size exited with $rc"; status=1; }
done
echo "done in $(( $(date +%s) - start )) s; results in $OUT"
exit $status
