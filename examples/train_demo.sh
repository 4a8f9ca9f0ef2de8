#!/usr/bin/env bash
# The commands that trained the shipped demo family, from the repository alone (2 CPU cores, no network).
# Each step resumes from its own train_state.pt when re-run; batches are a pure function of (seed, step).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-runs}

# corpus (this Python's standard library, data-like modules filtered out) and an 8k byte-level BPE
dspark train-tokenizer --output "$RUNS/data"

# the target: Qwen3 architecture, d=512, 8 layers, 29.4 M parameters, 1004 steps of 8 x 512 tokens (4.1 M tokens;
# the shipped run used 1 thread for steps 0-480 and 2 threads after a resume, about 62 minutes in all)
dspark train-target --data "$RUNS/data" --output "$RUNS/target" --threads 2 --batch-size 8 --seq-len 512 \
  --warmup-steps 100 --schedule-steps 1000 --steps 1004 --eval-every 50 --save-minutes 5 --seed 0

# a DSpark drafter (block 7, 2 layers, vanilla Markov head of rank 128, confidence head) and a draft LM
# (the two ran side by side, one thread each: about 28 and 13 minutes)
dspark train-draft "$RUNS/target" --method dspark --data "$RUNS/data" --output "$RUNS/dspark" --threads 1 \
  --block-size 7 --num-layers 2 --markov-rank 128 --markov-head vanilla --steps 700 --schedule-steps 700 \
  --warmup-steps 30 --eval-every 100 --no-frozen-copies --seed 0
dspark train-draft "$RUNS/target" --method draft-lm --data "$RUNS/data" --output "$RUNS/draft-lm" --threads 1 \
  --num-layers 2 --hidden-size 256 --steps 350 --schedule-steps 350 --warmup-steps 20 --eval-every 50 --seed 0

# ship the inference files (fp16 safetensors, configs, tokenizer); training state stays in $RUNS
for pair in target:target dspark:dspark-drafter draft-lm:draft-lm; do
  src="$RUNS/${pair%%:*}" dst="examples/${pair##*:}"
  mkdir -p "$dst"
  cp "$src"/*.json "$src"/model.safetensors "$dst"/
  cp "$src"/training_log.jsonl "$dst"/ 2>/dev/null || true
done
