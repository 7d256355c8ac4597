#!/bin/bash
# The GPU benchmarks in order of importance, each cut off so the whole fits a short GPU lease (default 540 s):
#   BUDGET=540 OUT=gpu_out bash benchmarks/gpu_checks.sh
# Needs the project's requirements (transformers >= 5.24) and, for the trainer run, tiny Shakespeare shards prepared
# beforehand: DATA_DIR=<folder prepared with --val_fraction 0.1> TEXT=<the .txt it came from> (the trainer reuses
# them; `datasets` is needed only to tokenize). AB_DIR=<another commit's files>: that commit's benchmark against this
# one's first (below). Each part's output goes to $OUT; BENCHMARKS.md's GPU sections came
# from these commands on H200s (2026-11-26). There, the CUDA parity tests took 60 s, 3 compiled variants at 16x1024
# with their memory children 146 s, 2 without them 50-70 s, a trainer run of 8 steps 65-80 s (micro-batch 32: step 1
# compiles for 29-49 s); 3 variants at 64x1024 did not finish in 200 s, nor did `-autotune` variants. Inductor's
# matmul autotuning alone (2026-11-27) took 190 s for the step's 15 shapes, cuBLAS won 14, and the step ran at 1.00x:
# not worth a lease.
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false TRANSFORMERS_VERBOSITY=error
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
T0=$(date +%s); DEADLINE=$((T0 + ${BUDGET:-540}))
left() { local l=$((DEADLINE - $(date +%s))); [ "$l" -lt 1 ] && l=1; [ "$l" -gt "$1" ] && echo "$1" || echo "$l"; }
mark() { echo "=== [t=$(($(date +%s) - T0))s] $*" | tee -a "$OUT/timeline.txt"; }

mark environment
{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch, transformers as t, accelerate as a; print('torch', torch.__version__, 'cuda', \
    torch.version.cuda, 'transformers', t.__version__, 'accelerate', a.__version__)"
} 2>&1 | tee "$OUT/env.txt"

mark "CUDA parity tests (about a minute)"
timeout "$(left 120)" python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -30 \
  | tee "$OUT/pytest_cuda.txt"

if [ -n "$AB_DIR" ]; then
  # BENCHMARKS.md, 2026-11-28: ours-defaults peaked 1.6 GiB higher at 16x1024 than on 2026-11-26 (CUDA only: not on a
  # CPU), and the trainer ran ~10% slower per micro-step. AB_DIR holds another commit's files (git archive REV | tar
  # -x -C DIR), e.g. 62cdd29 or 5f6df4c^, whose benchmark imports its own model: both, one after the other, twice.
  # A benchmark before c82a9e0 does not wait for the loss and the gradient norm: compare its times with that in mind.
  # 10002ea, the last commit whose step reads them before AdamW (two waits), measures what the one read after it
  # (guarded_optimizer_step, found_inf) gave.
  for tree in "$AB_DIR" . "$AB_DIR" .; do
    mark "ours-defaults at 124m:16x1024 from $tree"
    timeout "$(left 100)" python3 "$tree/benchmarks/train_throughput.py" --runs 124m:16x1024 --variants ours-defaults \
      --warmup 3 --steps 8 2>&1 | tee -a "$OUT/ab.md"
  done
fi

mark "training throughput, 124m:16x1024 (the issue's GPU target)"
timeout "$(left 230)" python3 benchmarks/train_throughput.py --runs 124m:16x1024 2>&1 | tee "$OUT/tt16.md"

mark "CUDA graphs (--compile_mode reduce-overhead) against the default mode, 124m:16x1024"
timeout "$(left 110)" python3 benchmarks/train_throughput.py --runs 124m:16x1024 --variants ours-defaults \
  ours-defaults-cudagraphs --no_memory --warmup 3 --steps 6 2>&1 | tee "$OUT/tt16_graphs.md"

if [ -n "$DATA_DIR" ] && [ -n "$TEXT" ]; then
  # micro-batch 32 needs a validation split of at least 32 x 1024 + 1 tokens: tiny Shakespeare's 0.1 has 33,803.
  # 262,144-token steps: tiny Shakespeare's training split (304,223 tokens at --val_fraction 0.1) holds less than the
  # preset's 524,289 that one step needs since every epoch is a whole number of steps (6fe4b08); the trainer refuses.
  # --overwrite_output_dir: a rerun on the same (warm) machine finds the last run's final/ in /tmp, an error otherwise
  for run in "16 default" "16 reduce-overhead" "32 default"; do
    set -- $run
    mark "the trainer, 124M defaults at micro-batch $1, --compile_mode $2, 8 steps of 262,144 tokens"
    timeout "$(left 90)" accelerate launch train_accelerate.py --dataset "$TEXT" --data_dir "$DATA_DIR" \
      --val_fraction 0.1 --output_dir /tmp/gpu_checks_mb$1_$2 --overwrite_output_dir true --micro_batch_size $1 \
      --total_batch_tokens 262144 --compile_mode $2 --max_steps 8 --warmup_steps 4 --eval_every 0 --eval_batches 1 \
      --sample_every 0 --save_every 0 --log_every 1 > "$OUT/train_mb$1_$2.log" 2>&1
    echo "rc=$?" >> "$OUT/train_mb$1_$2.log"
    cp /tmp/gpu_checks_mb$1_$2/metrics.jsonl "$OUT/metrics_mb$1_$2.jsonl" 2>/dev/null
  done
  # the fp16 resume across precisions (load_checkpoint; first run on an H200 on 2026-11-27, rc=0): a bf16 checkpoint
  # resumed in fp16 must start a loss scale ("no loss scale in the checkpoint"), an fp16 one resumed in bf16 drop it
  mark "resume across precisions: bf16 step 2 -> fp16 step 3 -> bf16 step 4, 65,536-token steps"
  R=/tmp/gpu_checks_precision; COMMON=(--dataset "$TEXT" --data_dir "$DATA_DIR" --val_fraction 0.1 --output_dir $R \
    --total_batch_tokens 65536 --warmup_steps 2 --eval_every 0 --eval_batches 1 --sample_every 0 --save_every 1 \
    --log_every 1)
  { timeout "$(left 80)" accelerate launch train_accelerate.py "${COMMON[@]}" --overwrite_output_dir true \
      --max_steps 2 --mixed_precision bf16; echo "rc=$?"
    # fp16's first step compiles anew (31-33 s on an H200); then the final evaluation and saves: 60 s cut it off
    timeout "$(left 110)" accelerate launch train_accelerate.py "${COMMON[@]}" --resume latest --max_steps 3 \
      --mixed_precision fp16; echo "rc=$?"
    timeout "$(left 60)" accelerate launch train_accelerate.py "${COMMON[@]}" --resume latest --max_steps 4 \
      --mixed_precision bf16; echo "rc=$?"
  } > "$OUT/resume_precision.log" 2>&1
  tr '\r' '\n' < "$OUT/resume_precision.log" | grep -E "^rc=|loss scale|resumed from|^ *step +[0-9]+/"
fi

mark "training throughput, 124m:64x1024"
timeout "$(left 170)" python3 benchmarks/train_throughput.py --runs 124m:64x1024 --warmup 2 --steps 3 \
  --variants ours-defaults ours-defaults-logits --memory_jobs 2 2>&1 | tee "$OUT/tt64.md"

mark "generation"
timeout "$(left 60)" python3 benchmarks/generate_throughput.py --modes eager 2>&1 | tee "$OUT/gen.md"
timeout "$(left 200)" python3 benchmarks/generate_throughput.py --modes static-compile --repeats 2 2>&1 \
  | tee "$OUT/genc.md"

mark "gradient checkpointing at 64x1024: memory saved and time paid (measured on CPU only so far)"
timeout "$(left 150)" python3 benchmarks/train_throughput.py --runs 124m:64x1024 --warmup 2 --steps 3 \
  --variants ours-defaults ours-defaults-ckpt 2>&1 | tee "$OUT/ckpt64.md"
# BENCHMARKS.md's hf-fp32 peak at 64x1024 (22,800 MiB, marked †) came from a memory child whose step had failed;
# since cdee846 such a child fails: its own peak, alone on the GPU (an out-of-memory line on an 80 GB card is a result).
# On 2026-11-28 it ran out of memory on an H200 too, beside the ~100 GB the parent's allocator still held after
# timing the variant; since then the parent frees that first (release_memory).
mark "hf-fp32 peak memory at 124m:64x1024, alone"
timeout "$(left 120)" python3 benchmarks/train_throughput.py --runs 124m:64x1024 --variants hf-fp32 --warmup 1 \
  --steps 1 --memory_jobs 1 2>&1 | tee "$OUT/hf_fp32_64_memory.md"
mark done
tar -czf "$OUT.tar.gz" -C "$OUT" . && echo "all of it in one file: $OUT.tar.gz"
