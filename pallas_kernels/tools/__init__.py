"""Kernel-development tooling for the Pallas kernels; production code does
not import it.

  triton_resources  what each Triton kernel asks of a Hopper SM (registers,
                    spills, shared memory) and the temporaries of
                    forward+backward, compiled on a CPU for sm_90
  tpu_compile       the TPU kernels compiled for TPU v4 / v5e / v5p / v6e by
                    libtpu's deviceless compiler (nothing runs)
  ncu_summary       headline rows of an Nsight Compute CSV report
  gdr_shapes        the rule's problem shape as absl flags (imported only
                    by the commands that take it)
  split_profile     each split kernel as a jitted call of its own, for
                    timing one by one
  gpu_checks.sh     the GPU checks in one call: compiled tests, the model
                    on the kernels, benchmarks and profiles

Run as `python -m pallas_kernels.tools.NAME` and
`bash pallas_kernels/tools/gpu_checks.sh [steps...]` from the repository
root.
"""
