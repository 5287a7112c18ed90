# Shared by the GPU step scripts (pallas_kernels/tools/gpu_checks.sh,
# experiments/model_gpu_checks.sh); sourced, not run. Made for calls with a
# time limit on a GPU machine: every step has a limit of its own and
# everything goes to one log in $OUT.
#
# Before sourcing, a script may set LOG_NAME (the log is $OUT/$LOG_NAME.log;
# default gpu_checks). Sourcing then
#   * creates $OUT (default /tmp/gpu_checks) and sets LOG;
#   * exports the environment of the runs (unbuffered Python, no GPU memory
#     preallocated by JAX, the checkout on PYTHONPATH, no test compilation
#     cache);
#   * installs the wheels carried in .whl/ (if any) into /tmp/site, without
#     their dependencies and without the index, and puts that first on
#     PYTHONPATH after the checkout;
#   * reads BUDGET_S (the whole run ends within BUDGET_S seconds of now) and
#     MIN_STEP_S (default 45), and defines `step`.

# BUDGET_S=N: the whole run ends within N seconds of starting (the call's
# limit; the wheels' install counts): each step's limit is cut to what is
# left, and a step with under MIN_STEP_S (45) seconds left is skipped, so
# order steps by priority.
DEADLINE=${BUDGET_S:+$(( $(date +%s) + BUDGET_S ))}

OUT=${OUT:-/tmp/gpu_checks}
mkdir -p "$OUT"
LOG="$OUT/${LOG_NAME:-gpu_checks}.log"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false FLA_TILELANG=0
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# No shared compilation cache for the tests here (tests/conftest.py makes one
# on CPU runs): not tried with the Triton kernels on a GPU yet.
export QWEN_JAX_TEST_JAX_CACHE=0
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

step() {  # step NAME SECONDS CMD...
  local name=$1 limit=$2 start rc left
  shift 2
  start=$(date +%s)
  if [ -n "$DEADLINE" ]; then
    left=$(( DEADLINE - start ))
    if [ "$left" -lt "${MIN_STEP_S:-45}" ]; then
      echo "=== $name skipped: ${left}s left of BUDGET_S" | tee -a "$LOG"
      return
    fi
    [ "$left" -lt "$limit" ] && limit=$left
  fi
  echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
  timeout "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  echo "=== $name rc=$rc in $(( $(date +%s) - start ))s" | tee -a "$LOG"
}
