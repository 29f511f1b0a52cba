#!/usr/bin/env bash
# The prepared GPU check (issue 15, item 5): one short run on one CUDA GPU, generating what it needs.
#
#   bash benchmarks/gpu_check.sh                 # on the GPU machine, from the repo root (~5 min on one H200)
#   SIZE=tiny DEVICE=cpu bash benchmarks/gpu_check.sh   # the script's own smoke run, anywhere
#
# It measures, and prints as a Markdown block for benchmarks/RESULTS.md ("GPU"):
#   1. a CUDA merge of the 1.5B x 3 benchmark models (run.py's), its time against the same merge on the CPU;
#   2. CPU-vs-GPU bit identity of the soup (every safetensors file byte for byte);
#   3. the greedy soup on the GPU (causal-lm perplexity on 64 generated texts), its time and peak GPU memory.
#
# The machine needs hub-soup's dependencies. Where pydantic and datasets are missing (the H200 image has
# torch, transformers, timm, safetensors, huggingface_hub and accelerate, not those), download their wheels
# here first into .whl/ (ignored by git), as the device README says, for example:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 -d .whl pydantic pydantic-core annotated-types typing-inspection \
#     datasets dill multiprocess
# and carry .whl: the script installs them into /tmp/site before it starts.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${SIZE:-1.5b}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-benchmarks/_work/gpu_check}
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if [ ! -x .venv/bin/hub-soup ]; then  # the machine's own torch, hub-soup from this tree
  python3 -m venv --system-site-packages .venv
  .venv/bin/pip install -q --no-deps --no-build-isolation --no-index -e .
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=.venv/bin/python
mkdir -p "$OUT"
MODELS=benchmarks/_work/models/$SIZE
$PY - "$SIZE" <<'EOF'
import sys
sys.path.insert(0, "benchmarks")
import run
run.generate(sys.argv[1], 3)
EOF
# A tokenizer for the eval (the benchmark models have none) and 64 texts of its words, saved with datasets.
$PY - "$MODELS" "$OUT/texts" <<'EOF'
import random, sys
from pathlib import Path
import datasets
from tests.checkpoints import save_tokenizer
save_tokenizer(Path(sys.argv[1]) / "ing0")
rng = random.Random(0)
texts = [" ".join(rng.choice(["soup", "is", "good"]) for _ in range(48)) for _ in range(64)]
datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"text": texts})}).save_to_disk(sys.argv[2])
EOF
INGREDIENTS=("$MODELS/ing0" "$MODELS/ing1" "$MODELS/ing2")
cat "$MODELS"/ing*/*.safetensors > /dev/null  # page cache warm for both merges

timed() {  # timed NAME COMMAND...: wall seconds into $OUT/NAME.s, output into $OUT/NAME.log
  local name=$1; shift
  TIMEFORMAT=%R
  { time "$@" > "$OUT/$name.log" 2>&1 || { cat "$OUT/$name.log"; exit 1; }; } 2> "$OUT/$name.s"
}
gpu_memory() {  # the GPU's memory in use, MiB, sampled every 100 ms into $OUT/$1.mem until killed
  while true; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits >> "$OUT/$1.mem" 2>/dev/null || true
    sleep 0.1; done
}

rm -rf "$OUT/soup-cpu" "$OUT/soup-gpu" "$OUT/greedy"
timed merge-cpu .venv/bin/hub-soup merge "${INGREDIENTS[@]}" --device cpu -o "$OUT/soup-cpu"
timed merge-gpu .venv/bin/hub-soup merge "${INGREDIENTS[@]}" --device "$DEVICE" -o "$OUT/soup-gpu"
identical=yes
for f in "$OUT"/soup-cpu/*.safetensors; do
  cmp -s "$f" "$OUT/soup-gpu/$(basename "$f")" || identical=no
done
: > "$OUT/greedy.mem"
gpu_memory greedy & SAMPLER=$!
timed greedy .venv/bin/hub-soup merge "${INGREDIENTS[@]}" --device "$DEVICE" --greedy --eval-task causal-lm \
  --eval-data "$OUT/texts" --eval-split validation --eval-batch-size 16 -o "$OUT/greedy"
kill "$SAMPLER" 2>/dev/null || true
peak=$(sort -n "$OUT/greedy.mem" | tail -1)
idle=$(sort -n "$OUT/greedy.mem" | head -1)
device_name=$($PY -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')")
cat <<EOF

### GPU check ($(date -u +%Y-%m-%d), $device_name, $SIZE x 3, bf16)

| what | value |
|---|---|
| merge on the CPU (s) | $(cat "$OUT/merge-cpu.s") |
| merge with --device $DEVICE (s) | $(cat "$OUT/merge-gpu.s") |
| CPU and GPU soups bit-identical | $identical |
| greedy soup on the GPU, causal-lm on 64 texts (s) | $(cat "$OUT/greedy.s") |
| greedy: peak GPU memory in use (MiB; before it: ${idle:-?}) | ${peak:-unmeasured (no nvidia-smi)} |

greedy table:
\`\`\`
$(grep -v -E "^(merging|scoring)" "$OUT/greedy.log" | tail -20)
\`\`\`
EOF
[ "$identical" = yes ]
