#!/usr/bin/env bash
# The model at real size on one GPU, against transformers in the same run:
# training, long prefill and greedy decoding of the 0.8B preset (random
# weights, bf16), in steps with time limits of their own
# (pallas_kernels/tools/gpu_steps.sh): every step logs to
# $OUT/model_gpu_checks.log (each number also as it is measured, so a step
# cut short keeps what it took) and writes its JSON to $OUT. Run it from the
# repository root:
#
#   OUT=/tmp/gpu BUDGET_S=470 bash experiments/model_gpu_checks.sh [steps...]
#
# transformers, its dependencies and flash-linear-attention travel as wheels
# in .whl/ (ignored by git; about 32 MB), installed without the index into
# /tmp/site. To build the folder (Python 3.12, x86_64), where the registry
# is reachable, leaving out what the GPU image has (numpy, and torch's
# filelock, fsspec and typing_extensions):
#
#   pip download transformers==5.25.0 --only-binary=:all: \
#       --python-version 3.12 --platform manylinux2014_x86_64 \
#       --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
#       -d .whl
#   pip download --no-deps fla-core==0.6.0 einops --only-binary=:all: \
#       --python-version 3.12 -d .whl
#   rm .whl/numpy-* .whl/filelock-* .whl/fsspec-* .whl/typing_extensions-*
#
# and on the GPU machine, in one call of 8 minutes that carries the folder
# (the step limits below add up to more than BUDGET_S: a step ends when its
# work is done, and what no longer fits is skipped and named in the log):
#
#   BUDGET_S=470 bash experiments/model_gpu_checks.sh      # carry: .whl
#
# Steps, in order of priority (the defaults: env train prefill decode
# train32k decode9b train2b train4b; the last ones are likely skipped in
# one call of 8 minutes, and a second call with their names takes them):
#   env       the GPU, versions; transformers and flash-linear-attention
#             imported (a missing wheel shows here).
#   train     experiments.bench_train at 1 x 8192: transformers + FLA
#             (float32 weights under bf16 autocast, fused AdamW), then ours
#             (cuDNN attention, full remat): tokens/s, MFU, peak memory.
#   prefill   experiments.bench_generate: one prompt of 32,768, 131,072 and
#             262,144 tokens in one block (ours, cuDNN attention: the jnp
#             attention reads every cache slot per query block), tokens/s
#             and peak memory; transformers at 32,768 and 131,072.
#   decode    greedy decoding at batch 1, 16 and 64 (1024-token prompt, 64
#             new tokens), ours and transformers, with the bf16 bandwidth
#             floor (weights and cache read once a step) beside ours.
#   train32k  ours at 1 x 32768.
#   decode9b  the 9B preset at batch 1, ours.
#   train2b   the 2B preset at 1 x 8192, ours: tokens/s, MFU, memory.
#   train4b   the 4B preset at 1 x 8192, ours (float32 weights and AdamW
#             state alone are 64 GB: an out of memory is a row).
# Also:
#   train_xla   ours at 1 x 8192 and 1 x 32768 with the default (jnp)
#               attention: whether cuDNN's is worth the default.
#   train_lean  ours at 1 x 32768 with the "lean" gated-delta-rule tiling
#               (no per-chunk states stored).
#   prefill_xla ours at 32,768 tokens in blocks of 8192 with the jnp
#               attention (the default path).
#   unscan      decoding with scan_layers=False (batch 1 and 64; on a CPU
#               the unscanned stack decodes faster).
#   memory      XLA's memory analysis of the compiled programs on the GPU
#               (experiments.model_memory, compile only): train at 8k and
#               32k, prefill at 262,144 in one block, decode at 1, 16, 64.
#   prefill9b   the 9B preset's prefill at 32,768 and 131,072 tokens, ours.
#   moe35b      the 35B-A3B (mixture of experts; 65 GiB of bf16 weights:
#               run it on an H200, kind nvidia-h200) against transformers'
#               Qwen3_5MoeForCausalLM: prefill at 8,192 and 32,768 tokens,
#               greedy decoding at batch 1 and 16 (1024-token prompt, 32
#               new tokens). transformers runs first and gives its memory
#               back; JAX may then take 95% of the GPU.
set -u
LOG_NAME=model_gpu_checks
# OUT, LOG, the environment, the carried wheels, BUDGET_S and `step`.
. "$(dirname "${BASH_SOURCE[0]}")/../pallas_kernels/tools/gpu_steps.sh"

# The decode workload of the decode, decode9b and unscan steps.
DECODE=(--decode_prompt 1024 --decode_new 64 --repeats 2 --noquality
        --prefill_lengths "")

steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(env train prefill decode train32k decode9b train2b train4b)
for s in "${steps[@]}"; do
  case $s in
    env)
      step env 40 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv;
        python3 -c "import sys, jax, jaxlib, flax, triton, torch; print(sys.version); print(\"jax\", jax.__version__, \"jaxlib\", jaxlib.__version__, \"flax\", flax.__version__, \"triton\", triton.__version__, \"torch\", torch.__version__); print(jax.devices())";
        python3 -c "import transformers, fla; print(\"transformers\", transformers.__version__, \"fla\", getattr(fla, \"__version__\", \"?\"))"' ;;
    train)
      step train 170 python3 -m experiments.bench_train --hf \
        --seq_lens 8192 --steps 5 --attention cudnn \
        --json_out "$OUT/train.json" ;;
    prefill)
      step prefill 170 python3 -m experiments.bench_generate --hf \
        --attention cudnn --prefill_block 262144 \
        --prefill_lengths 32768,131072,262144 \
        --hf_prefill_lengths 32768,131072 --decode_batches "" \
        --variants scan --prefill_variants scan --noquality --repeats 2 \
        --json_out "$OUT/prefill.json" ;;
    decode)
      step decode 170 python3 -m experiments.bench_generate --hf \
        --attention cudnn --decode_batches 1,16,64 "${DECODE[@]}" \
        --variants scan --prefill_variants= --json_out "$OUT/decode.json" ;;
    train32k)
      step train32k 120 python3 -m experiments.bench_train \
        --seq_lens 32768 --steps 3 --attention cudnn \
        --json_out "$OUT/train32k.json" ;;
    decode9b)
      step decode9b 150 python3 -m experiments.bench_generate \
        --preset qwen3.5-9b --attention cudnn --decode_batches 1 \
        "${DECODE[@]}" --decode_new 32 --variants scan --prefill_variants= \
        --json_out "$OUT/decode9b.json" ;;
    train2b|train4b)
      step "$s" 150 python3 -m experiments.bench_train \
        --preset "qwen3.5-${s#train}" --seq_lens 8192 --steps 3 \
        --attention cudnn --json_out "$OUT/$s.json" ;;
    train_xla)
      step train_xla 200 python3 -m experiments.bench_train \
        --seq_lens 8192,32768 --steps 3 --attention xla \
        --json_out "$OUT/train_xla.json" ;;
    train_lean)
      step train_lean 120 python3 -m experiments.bench_train \
        --seq_lens 32768 --steps 3 --attention cudnn --gdr_block_sizes lean \
        --json_out "$OUT/train_lean.json" ;;
    prefill_xla)
      step prefill_xla 150 python3 -m experiments.bench_generate \
        --prefill_lengths 32768 --decode_batches "" --variants scan \
        --prefill_variants scan --noquality --repeats 2 \
        --json_out "$OUT/prefill_xla.json" ;;
    unscan)
      step unscan 170 python3 -m experiments.bench_generate \
        --attention cudnn --decode_batches 1,64 "${DECODE[@]}" \
        --variants unscan --prefill_variants= --json_out "$OUT/unscan.json" ;;
    memory)
      step memory 150 bash -c "python3 -m experiments.model_memory \
        --programs train --seq_lens 8192,32768 --attention cudnn \
        --json_out '$OUT/memory_train.json' && python3 -m \
        experiments.model_memory --programs prefill,decode --seq_lens 262144 \
        --prefill_block 262144 --attention cudnn \
        --json_out '$OUT/memory_prefill.json'" ;;
    prefill9b)
      step prefill9b 170 python3 -m experiments.bench_generate \
        --preset qwen3.5-9b --attention cudnn --prefill_block 131072 \
        --prefill_lengths 32768,131072 --decode_batches "" --variants scan \
        --prefill_variants scan --noquality --repeats 2 \
        --json_out "$OUT/prefill9b.json" ;;
    moe35b)
      step moe35b 300 env XLA_PYTHON_CLIENT_MEM_FRACTION=.95 \
        python3 -m experiments.bench_generate --hf \
        --preset qwen3.5-35b-a3b --attention cudnn --prefill_block 32768 \
        --prefill_lengths 8192,32768 --decode_batches 1,16 \
        --decode_prompt 1024 --decode_new 32 --variants scan \
        --prefill_variants scan --noquality --repeats 2 \
        --json_out "$OUT/moe35b.json" ;;
    *) echo "unknown step $s" | tee -a "$LOG" ;;
  esac
done
grep -E "^(===|preset|memory bandwidth|  measured|  (qwen_jax|transformers) |\| |NOTE|wrote|Traceback|[A-Za-z]*Error)" "$LOG" | tail -n 150
