"""The gated delta rule's problem shape as absl flags.

Shared by the commands that take it (experiments.bench_gated_delta_rule,
triton_resources, tpu_compile), so that one process can import several.
The flags are defined on import, so triton_resources and tpu_compile
import this module only when they run as commands. The defaults are the benchmark shape of docs/measurements/: B=1,
T=32768, 16 heads, dk = dv = 128, bf16.
"""

from absl import flags

BATCH = flags.DEFINE_integer("batch", 1, "Sequences per batch.")
SEQ_LEN = flags.DEFINE_integer("seq_len", 32768, "Tokens per sequence.")
HEADS = flags.DEFINE_integer("heads", 16, "Value heads (hv).")
KEY_HEADS = flags.DEFINE_integer("key_heads", None,
                                 "Key heads (hk); default = --heads.")
DK = flags.DEFINE_integer("dk", 128, "Key head dim.")
DV = flags.DEFINE_integer("dv", 128, "Value head dim.")
DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"],
                          "dtype of q, k, v.")
