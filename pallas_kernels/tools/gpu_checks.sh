#!/usr/bin/env bash
# GPU checks in one call: the Pallas kernel tests compiled on the GPU, the
# model on the Pallas path, and the gated-delta-rule benchmark against the
# jnp chunked path and flash-linear-attention (when its wheel is carried in
# .whl/). Made for calls with a time limit on a GPU machine: every step has
# a limit of its own, everything is logged to $OUT/gpu_checks.log and the
# benchmark JSON goes to $OUT. Run it from the repository root:
#
#   OUT=/tmp/gpu bash pallas_kernels/tools/gpu_checks.sh [steps...]
#
# Steps (default: env tests model lean2_32k ncu_blocks32k memory2_32k
# repeat2_32k scaling8k, in order of priority). On an H100 (the logs of
# docs/measurements/2026-11-27-h100-e58d8ea and 2026-11-27-h100-a998346)
# env, tests (4 xdist workers), model (4 workers), memory2_32k,
# repeat2_32k, warps32k and scaling8k took 10, 126, 128, 50, 54, 93 and
# 36 s, and lean2_32k over 240 with five variants. `BUDGET_S=560 bash
# pallas_kernels/tools/gpu_checks.sh` in a 600 s call runs the defaults
# and skips what no longer fits; a second call runs what was skipped.
# Also: options32k defaults32k lean32k warps32k memory32k hlo32k ncu32k
# bench32k tests_all profile32k prep32k best32k final32k base32k split32k
# scaling bench8k.
set -u
LOG_NAME=gpu_checks
# OUT, LOG, the environment, the carried wheels, BUDGET_S and `step`.
. "$(dirname "${BASH_SOURCE[0]}")/gpu_steps.sh"

bench() {  # bench NAME SECONDS SEQ_LEN ITERS [extra flags]
  local name=$1 limit=$2 t=$3 iters=$4
  shift 4
  step "$name" "$limit" python3 -m experiments.bench_gated_delta_rule \
    --batch 1 --seq_len "$t" --heads 16 --dk 128 --dv 128 --dtype bfloat16 \
    --implementations pallas,fla,chunked --iters "$iters" --warmup 2 \
    --json_out "$OUT/$name.json" "$@"
}

# Nsight Compute: $NCU, else on the PATH, else the newest under /opt.
NCU=${NCU:-$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | tail -n 1)}

# The compiled tests in parallel processes where pytest-xdist is installed
# (Triton's compiles are CPU-bound; the device image has 16 cores).
XDIST=$(python3 -c "import xdist" 2>/dev/null && echo "-n ${TEST_WORKERS:-4}")

steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(env tests model lean2_32k ncu_blocks32k memory2_32k repeat2_32k scaling8k)
for s in "${steps[@]}"; do
  case $s in
    env)
      step env 60 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv;
        python3 -c "import sys, jax, jaxlib, flax, triton, torch; print(sys.version); print(\"jax\", jax.__version__, \"jaxlib\", jaxlib.__version__, \"flax\", flax.__version__, \"triton\", triton.__version__, \"torch\", torch.__version__); print(jax.devices())"' ;;
    tests)  # GPU defaults (split) in f32 and bf16, bf16 blocked solve and
      # full tiles, API
      step tests 180 env JAX_DEFAULT_MATMUL_PRECISION=highest python3 -m pytest $XDIST \
        -q -p no:cacheprovider -W ignore::DeprecationWarning \
        tests/test_pallas_gated_delta_rule.py \
        -k "(gpu_defaults or t200_bf16_segments_solve16 or full_tiles or dv_tiles_chunk32 or api_dispatch or output_in_state or bwd_block or fwd_block or stride2 or recompute or paired) and not memory_bound" ;;
    tests_all)
      step tests_all 300 env JAX_DEFAULT_MATMUL_PRECISION=highest python3 -m pytest $XDIST \
        -q -p no:cacheprovider -W ignore::DeprecationWarning \
        tests/test_pallas_gated_delta_rule.py ;;
    model)  # the whole model on the split kernels (the "auto" path on GPUs)
      step model "${MODEL_LIMIT:-240}" env JAX_DEFAULT_MATMUL_PRECISION=highest python3 -m pytest $XDIST \
        -q -p no:cacheprovider -W ignore::DeprecationWarning \
        tests/test_model_packing.py -k pallas ;;
    # pallas (GPU defaults), FLA, chunked, and the tiling whose kernels
    # summed least in options32k's profile, if not the defaults; then the
    # defaults kernel by kernel.
    bench32k) bench bench32k "${BENCH_LIMIT:-300}" 32768 5 --profile_kernels \
      --variants_from_profile "$OUT/options32k.json" ;;
    # The defaults, the fastest tiling of profile32k and prep32k (those
    # that ran first), chunked and FLA, forward and forward+backward.
    best32k) bench best32k 220 32768 5 \
      --variants_from_profile "$OUT/profile32k.json,$OUT/prep32k.json" ;;
    # The run of docs/measurements/2026-11-27-h100-ae2f428 (options32k):
    # end to end against FLA (20 runs; XLA's temporaries per variant),
    # output_in_state, with the forward and the backward in blocks of 4096
    # tokens, and the stride-2 memory-lean form; kernel by kernel the
    # defaults, output_in_state, prep in 2 warps (which also ran bwd_out
    # and wy in 4) and sub-chunks of 16. That run's defaults were
    # ae2f428's (kernel_warps=bwd_out:8+wy:8/output_in_state=False), not
    # today's. The e2e lines are logged as measured, so a step cut short
    # by its limit still leaves them.
    options32k) bench options32k 330 32768 20 --implementations pallas,fla \
      --pallas_variants "output_in_state=True,output_in_state=True/fwd_block=4096/bwd_block=4096,output_in_state=True/fwd_block=2048/bwd_block=2048/state_stride=2" \
      --profile_kernels --profile_variants "output_in_state=True,kernel_warps=prep:2,sub_chunk=16/kernel_warps=prep:2" ;;
    # The GPU defaults end to end against those of ae2f428 (bwd_out and
    # wy in 8 warps, three forward kernels), output_in_state under
    # autodiff too, and FLA; 20 runs (2026-11-27-h100-e58d8ea/
    # defaults32k.json).
    defaults32k) bench defaults32k 240 32768 20 --implementations pallas,fla \
      --pallas_variants "kernel_warps=bwd_out:8+wy:8/output_in_state=False,output_in_state=True" ;;
    # The memory-lean forms end to end beside FLA (10 runs; XLA's
    # temporaries of the timed program beside): no per-chunk states
    # stored, each backward block's recomputed (recompute_states) in
    # blocks of 4096: "paired" under block_loop "auto" (unrolled), its
    # pair in 3 pipelining stages (one program an SM, two waves, against
    # two an SM in 2 stages), scanned, and recompute_states=True
    # (2026-11-27-h100-e58d8ea/lean32k.json has the variants before
    # these).
    lean32k) bench lean32k 240 32768 10 --implementations pallas,fla \
      --pallas_variants "recompute_states=paired/fwd_block=4096/bwd_block=4096,recompute_states=paired/fwd_block=4096/bwd_block=4096/kernel_stages=state_pair:3,recompute_states=paired/fwd_block=4096/bwd_block=4096/block_loop=scan,recompute_states=True/fwd_block=4096/bwd_block=4096" ;;
    lean2_32k)  # the "lean" preset (block_sizes.PRESETS) against FLA and the
      # defaults; the backward's sequential kernels in value tiles of 32
      # (bwd_block_dv), the pair in 3 stages (one program an SM) or 2
      # (value tiles of 32 for every sequential kernel took the backward
      # 0.13 ms less, the forward 0.07 more: 2026-11-27-h100-a998346/
      # bv32.json)
      bench lean2_32k 240 32768 20 --implementations pallas,fla \
      --pallas_variants "${LEAN_VARIANTS:-lean,lean/bwd_block_dv=32/kernel_stages=state_pair:3,lean/bwd_block_dv=32}" ;;
    memory2_32k)
      step memory2_32k 200 python3 -m experiments.bench_gated_delta_rule \
        --batch 1 --seq_len 32768 --heads 16 --dk 128 --dv 128 --dtype bfloat16 \
        --op_memory --pallas_variants "lean,recompute_states=paired/fwd_block=None/bwd_block=4096,recompute_states=True/fwd_block=None/bwd_block=4096" ;;
    repeat2_32k)  # a second process, FLA first
      step repeat2_32k 200 python3 -m experiments.bench_gated_delta_rule \
        --batch 1 --seq_len 32768 --heads 16 --dk 128 --dv 128 --dtype bfloat16 \
        --implementations fla,pallas --iters 40 --warmup 3 \
        --pallas_variants "${REPEAT_VARIANT:-lean}" \
        --json_out "$OUT/repeat2_32k.json" ;;
    # Kernel by kernel, warps and tiles that the ncu profile
    # (2026-11-27-h100-ae2f428/ncu32k.csv.gz) points to (latency-bound
    # kernels with 1 or 2 programs an SM): the prep with P in 2 warps
    # (ptxas spills 508 bytes there against 196 for the plain prep, which
    # was 24% faster in 2), wy and bwd_out in narrower column tiles (fewer
    # registers, perhaps 3 programs an SM), and the sequential kernels in
    # value tiles of 8 (256 programs, 2 an SM, at twice the reads of w and
    # k); recompute_states' kernels (profiled unblocked: state_fwd again
    # and bwd_pdo in the backward), "paired" (its state_pair against
    # state_fwd + state_bwd: two passes side by side, two programs an SM,
    # or one after the other?), bwd_pdo in 4 warps and in 2.
    warps32k) step warps32k 240 python3 -m experiments.bench_gated_delta_rule \
        --batch 1 --seq_len 32768 --heads 16 --dk 128 --dv 128 --dtype bfloat16 \
        --implementations= --iters 5 --warmup 1 --profile_kernels \
        --profile_variants "${WARPS_VARIANTS:-output_in_state=True/kernel_warps=prep:2+prep_out:2,wy_block=32/out_block=16,block_dv=8,recompute_states=True/fwd_block=4096/bwd_block=4096,recompute_states=paired/fwd_block=4096/bwd_block=4096,recompute_states=True/fwd_block=4096/bwd_block=4096/kernel_warps=prep:2+prep_out:4+bwd_pdo:2}" \
        --json_out "$OUT/warps32k.json" ;;
    # The H200 run of f32_dot (2026-11-26-h100-fb7591c/tuning_notes.md).
    final32k) bench final32k "${BENCH_LIMIT:-260}" 32768 5 \
      --pallas_variants f32_dot=bf16x3,f32_dot=bf16 ;;
    split32k)  # the sequence cut into pieces inside the device
      step split32k 240 python3 -m experiments.bench_gated_delta_rule \
        --batch 1 --seq_len 32768 --heads 16 --dk 128 --dv 128 --dtype bfloat16 \
        --implementations pallas,chunked --iters 5 --warmup 1 \
        --seq_splits 4,8 --json_out "$OUT/split32k.json" ;;
    # Throughput at 8k against the 32k runs': each mode also timed
    # with calls queued back to back (the "_queued" rows), which tells the
    # device's time per call from the latency of launching and waiting.
    scaling8k) bench scaling8k 150 8192 20 --implementations pallas,fla ;;
    # XLA's temporaries of the rule as an operation (cotangents arguments;
    # output, final state and gradients results: what the memory bound,
    # the per-chunk states' 256 MiB here, limits), compiled and not run,
    # for the defaults and the forms that store no per-chunk states:
    # recompute_states=True and "paired" under block_loop "auto"
    # (unrolled), then "paired" scanned. 2026-11-27-h100-e58d8ea/
    # gpu_checks.log has the H100's counts (980.0, 157.0, 248.0 scanned,
    # 255.0 unrolled); XLA's count on the CPU
    # (triton_resources.xla_temporaries) gives the same for the scanned
    # forms and 248.0 for the unrolled one.
    memory32k)
      step memory32k 200 python3 -m experiments.bench_gated_delta_rule \
        --batch 1 --seq_len 32768 --heads 16 --dk 128 --dv 128 --dtype bfloat16 \
        --op_memory --pallas_variants "recompute_states=True/fwd_block=4096/bwd_block=4096,recompute_states=paired/fwd_block=4096/bwd_block=4096,recompute_states=paired/fwd_block=4096/bwd_block=4096/block_loop=scan" ;;
    # XLA's optimised GPU programs of memory32k's tilings (forward+backward
    # as an operation), for reading on a CPU afterwards: whether the blocked
    # forms' scans copy whole-sequence arrays (o, h, dq, dk, dv) each step
    # instead of writing them in place, one suspect for their cost (the
    # memory-lean form took 35% longer than output_in_state alone, ~0.1 ms
    # a backward block). In $OUT/hlo32k.tgz (the *after_optimizations.txt
    # files only).
    hlo32k)
      rm -rf /tmp/hlo32k
      step hlo32k 120 env XLA_FLAGS="--xla_dump_to=/tmp/hlo32k --xla_dump_hlo_as_text" \
        python3 -m experiments.bench_gated_delta_rule \
        --batch 1 --seq_len 32768 --heads 16 --dk 128 --dv 128 --dtype bfloat16 \
        --op_memory --pallas_variants "output_in_state=True/fwd_block=4096/bwd_block=4096,output_in_state=True/fwd_block=2048/bwd_block=2048/state_stride=2"
      (cd /tmp/hlo32k 2>/dev/null && tar czf "$OUT/hlo32k.tgz" *after_optimizations.txt) ;;
    scaling)  # throughput against length: pallas and FLA at 8k and 128k
      for t in 8192 131072; do
        step "scaling$t" 150 python3 -m experiments.bench_gated_delta_rule \
          --batch 1 --seq_len "$t" --heads 16 --dk 128 --dv 128 \
          --dtype bfloat16 --implementations pallas,fla --iters 5 --warmup 1 \
          --json_out "$OUT/scaling$t.json"
      done ;;
    bench8k) bench bench8k 200 8192 10 ;;
    # Nsight Compute's counters for each kernel of one forward+backward at
    # 32k, the defaults then output_in_state (bench --once: 15 launches):
    # time, throughput against the SM / DRAM / L2 peaks, occupancy and the
    # warps' stall reasons, to tell latency from bandwidth (the sequential
    # kernels read w and k once per value tile, 8 x at value tiles of 16;
    # prep runs 8 warps an SM). Full CSV in $OUT/ncu32k.csv; the log gets
    # the headline rows. Needs access to the GPU's performance counters,
    # which some sandboxed machines do not give.
    ncu32k)
      step ncu32k "${NCU_LIMIT:-240}" bash -c "'${NCU:-ncu}' --clock-control none \
        --kernel-name regex:gated_delta_rule --launch-count 15 \
        --section SpeedOfLight --section MemoryWorkloadAnalysis \
        --section Occupancy --section LaunchStats --section WarpStateStats \
        --section SchedulerStats \
        --metrics 'regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio' \
        --csv --page details \
        python3 -m experiments.bench_gated_delta_rule --batch 1 --seq_len 32768 \
        --heads 16 --dk 128 --dv 128 --dtype bfloat16 --once \
        --pallas_variants output_in_state=True > '$OUT/ncu32k.csv'"
      python3 -m pallas_kernels.tools.ncu_summary "$OUT/ncu32k.csv" >>"$LOG" 2>&1 ;;
    # Where the blocked forms' time goes: each kernel launch of one
    # forward+backward, for the defaults, output_in_state=True, the "lean"
    # preset and recompute_states=True in blocks of 4096, summed per
    # tiling and kernel name (ncu_summary --by_tiling). Kernel time near
    # the unblocked form's says the rest is between kernels (launches),
    # well above it names the kernels that lose. ~150 launches, Duration
    # only.
    ncu_blocks32k)
      step ncu_blocks32k "${NCU_LIMIT:-240}" bash -c "'${NCU:-ncu}' --clock-control none \
        --kernel-name regex:gated_delta_rule --section SpeedOfLight \
        --csv --page details \
        python3 -m experiments.bench_gated_delta_rule --batch 1 --seq_len 32768 \
        --heads 16 --dk 128 --dv 128 --dtype bfloat16 --once \
        --pallas_variants output_in_state=True,lean,recompute_states=True/fwd_block=4096/bwd_block=4096 \
        > '$OUT/ncu_blocks32k.csv'"
      python3 -m pallas_kernels.tools.ncu_summary --by_tiling "$OUT/ncu_blocks32k.csv" >>"$LOG" 2>&1 ;;
    profile32k)  # each split kernel alone, for several tilings; no pipeline timing
      step profile32k 200 python3 -m experiments.bench_gated_delta_rule \
        --batch 1 --seq_len 32768 --heads 16 --dk 128 --dv 128 --dtype bfloat16 \
        --implementations= --iters 5 --warmup 1 --profile_kernels \
        --profile_variants "${PROFILE_VARIANTS:-kernel_warps=,solve_block=16,wy_block=None/out_block=None,num_warps_intra=8,wy_block=32/out_block=64,f32_dot=bf16}" \
        --json_out "$OUT/profile32k.json" ;;
    prep32k)  # prep on full tiles in 4 warps (the default before sub-chunks), other
      # solve blocks, and the sequential kernels in 8 warps
      step prep32k 200 python3 -m experiments.bench_gated_delta_rule \
        --batch 1 --seq_len 32768 --heads 16 --dk 128 --dv 128 --dtype bfloat16 \
        --implementations= --iters 5 --warmup 1 --profile_kernels \
        --profile_variants "${PREP_VARIANTS:-sub_chunk=None/kernel_warps=prep:4,sub_chunk=None/solve_block=16/kernel_warps=prep:4,solve_block=8,num_warps=8}" \
        --json_out "$OUT/prep32k.json" ;;
    base32k)  # the baselines alone: chunked jnp, then FLA
      step base32k 200 python3 -m experiments.bench_gated_delta_rule \
        --batch 1 --seq_len 32768 --heads 16 --dk 128 --dv 128 --dtype bfloat16 \
        --implementations chunked,fla --iters 5 --warmup 1 \
        --json_out "$OUT/base32k.json" ;;
    *) echo "unknown step $s" | tee -a "$LOG" ;;
  esac
done
grep -E "^(===|gated delta rule on|implementation|measured|split kernel|prep|state_|output|bwd_|wy|pallas|chunked|fla|skipped|sum|profile|NOTE|ran |ncu |[0-9]+ (passed|failed)|FAILED|E  )" "$LOG" | tail -n 120
