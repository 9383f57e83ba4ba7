#!/usr/bin/env bash
# Memory-form ablation at equal steps on the same data (MODEL_CARD.md, "Ablation").
# Usage: bash bench/ablation.sh [ARM ...]   (arms: paper paper+conv normalized normalized+conv)
# Each arm: the embedded model's architecture trained from scratch for 1,000 steps with
# the same data stream and schedule, then passkey at 2, 8 and 64 segments and held-out
# perplexity (first 32K tokens of each held-out book), memory on and off.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(uname -s)" = Linux ] && export LD_PRELOAD=${LD_PRELOAD:-/usr/lib/x86_64-linux-gnu/libopenblas.so.0}
declare -A FORM=(
  [paper]='{"segment_len": 64}'
  [paper+conv]='{"segment_len": 64, "conv_size": 4}'
  [normalized]='{"segment_len": 64, "memory": "normalized"}'
  [normalized+conv]='{"segment_len": 64, "memory": "normalized", "conv_size": 4}'
)
ARMS=("$@"); [ ${#ARMS[@]} -eq 0 ] && ARMS=(paper paper+conv normalized normalized+conv)
for arm in "${ARMS[@]}"; do
  run=runs/ablation/$arm
  infini train "$run" --tokenizer infini_mlx/default_model \
    --arch '{"hidden_size": 128, "num_hidden_layers": 4, "intermediate_size": 384, "num_attention_heads": 4, "num_key_value_heads": 4}' \
    --infini "${FORM[$arm]}" \
    --steps 1000 --batch-size 8 --segments 2,4 --segments-final 2,16 --curriculum-steps 2000 \
    --mix passkey=0.6,lm=0.25,needle=0.15 --answer-weight 10 --loss-positions 48 --lr 1e-3 --warmup 50 --seed 0 \
    --eval-every 100 --eval-segments 2,8,32 --checkpoint-every 100 > "$run.log" 2>&1
  infini passkey --model "$run/checkpoint/model" --lengths 128,512,4k --trials 20 --batch 15 --seed 0 \
    --perplexity --ppl-tokens 32768 | tee "$run.eval.txt"
done
