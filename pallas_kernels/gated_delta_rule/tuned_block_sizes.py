"""Tuned tilings of the gated delta rule kernels, per backend: data only.

`BlockSizes.get_default(backend)` is `BlockSizes(**DEFAULTS[backend])`;
fields a backend leaves out keep the dataclass defaults. Each entry names
where its value comes from, as a path under docs/measurements/: a run's
log or JSON (H100, B=1, T=32768, H=16, D=128, bf16 unless it says), or
that folder's tuning_notes.md for choices made on a run whose raw output
is not kept or on a compiled-not-run count. "Structural" marks a value
that the kernels need rather than one that was tuned.

Shape-dependent choices are rules over the numbers here, not rows: the
TPU's value tile from TPU_STATE_TILE (`block_sizes.tpu_value_tile`), and
default blocks that do not divide another chunk size fall back to whole
chunks (`pallas_gdr.block_sizes_for`).
"""

from __future__ import annotations

DEFAULTS: dict[str, dict[str, object]] = {
    "gpu": {
        # Structural: the split kernels loop over chunks in the program.
        "chunk_loop": "kernel",
        # 2026-11-26-h100-fb7591c/tuning_notes.md (fused bwd: no fit).
        "kernels": "split",
        # 2026-11-26-h100-fb7591c/tuning_notes.md (H200 profile).
        "block_dv": 16,
        # 2026-11-26-h100-fb7591c/prep32k.json (num_warps=8: state_bwd slower).
        "num_warps": 4,
        # 2026-11-26-h100-fb7591c/tuning_notes.md (H200 profile).
        "num_stages": 3,
        # 2026-11-27-h100-ae2f428/options32k.json (bwd_out, wy: 4 beat 8).
        "num_warps_intra": 4,
        # 2026-11-26-h100-fb7591c/prep32k.json (16 slower, 8 within noise).
        "solve_block": 1,
        # 2026-11-26-h100-fb7591c/prep32k.json (None within noise).
        "sub_chunk": 32,
        # 2026-11-26-h100-fb7591c/tuning_notes.md (H200 end to end).
        "f32_dot": "auto",
        # 2026-11-26-h100-fb7591c/tuning_notes.md (ptxas spills).
        "wy_block": 64,
        # 2026-11-26-h100-fb7591c/tuning_notes.md (ptxas spills).
        "out_block": 32,
        # prep: 2026-11-27-h100-ae2f428/options32k.json; prep_out: its
        # tuning_notes.md (ptxas spills in 2 warps).
        "kernel_warps": (("prep", 2), ("prep_out", 4)),
        # 2026-11-27-h100-ae2f428/gpu_checks.log, options32k (inference
        # forward); 2026-11-27-h100-e58d8ea/defaults32k.json (autodiff).
        "output_in_state": "inference",
        # Blocks and recomputation stay off: 2026-11-27-h100-a998346/
        # gpu_checks.log (lean2_32k: "lean" 9% to 12% slower).
    },
    "tpu": {
        # Structural: a whole sequence per program does not fit VMEM.
        "chunk_loop": "grid",
        # Structural: the split kernels need chunk_loop "kernel".
        "kernels": "fused",
        # tests/test_tpu_compile.py (compiled for v4, v5e, v5p, v6e).
        "block_dv": "auto",
    },
    # Interpret mode: the dataclass defaults (IEEE f32 products, whole
    # value tiles, the row-by-row solve).
    "cpu": {},
}

# The fused TPU kernels' state tile under block_dv "auto": at most this
# many elements (dk x tile). tests/test_tpu_compile.py: the backward with
# whole 512 x 512 states overflows the scoped VMEM of v4 and v5e.
TPU_STATE_TILE = 256 * 256

# block_loop "auto" unrolls loops of at most this many blocks.
# 2026-11-27-h100-e58d8ea/lean32k.json (7 blocks: unrolled faster).
AUTO_UNROLL_BLOCKS = 16

# Named tilings, items of a `BlockSizes.parse_spec` spec.
PRESETS: dict[str, str] = {
    # No per-chunk states kept: forward+backward holds less than their
    # bytes from 32k tokens at 16 heads, D = 128 (shorter: a smaller
    # bwd_block). 2026-11-27-h100-a998346/gpu_checks.log (lean2_32k,
    # memory2_32k).
    "lean": "output_in_state=inference/recompute_states=paired/"
            "fwd_block=16384/bwd_block=4096",
}
