# %% [markdown]
# # Fine-tune a Qwen3.5 checkpoint on your chats
#
# The project's fine-tuning run (`experiments.train` with
# `experiments/configs/finetune.py`) adapts a transformers checkpoint
# folder to your own data: continued pre-training on text, or supervised
# fine-tuning on chat conversations with the loss on the assistant turns.
# Full fine-tuning or LoRA (`lora_rank > 0`: only small adapters train).
#
# So that this notebook runs anywhere in a minute or two (and in CI), it
# builds its own checkpoint: a tiny random Qwen3.5 and a tiny tokenizer
# trained here, with a ChatML chat template. With a real checkpoint, skip
# to "The run" and set `INIT` to its folder (e.g. a downloaded
# `Qwen/Qwen3.5-0.8B`) and `DATA` to your .jsonl.
#
# On Colab, install first (a code cell):
# `%pip install "qwen-jax @ git+<this repository's URL>"`

# %%
import json
import os
import tempfile

import jax
import tokenizers
from tokenizers import decoders, pre_tokenizers, processors

from qwen_jax import checkpoint, train_step
from qwen_jax.config import QwenConfig

print("jax", jax.__version__, "on", jax.default_backend())
ROOT = tempfile.mkdtemp(prefix="qwen_finetune_")
INIT = os.path.join(ROOT, "tiny-checkpoint")

# %% [markdown]
# ## A tiny checkpoint with a tokenizer and a chat template
# A byte-level BPE trained on a few sentences, Qwen's special tokens, and a
# ChatML template (`<|im_start|>role\ncontent<|im_end|>\n`). The model is
# the `tiny` preset with random weights, saved as transformers saves one.

# %%
CHAT_TEMPLATE = (
    "{%- for m in messages %}"
    "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}")
SENTENCES = [
    "What is the capital of France? The capital of France is Paris.",
    "What is two plus two? Two plus two is four.",
    "Which planet is the largest? Jupiter is the largest planet.",
    "Hello! How can I help you today?",
]

tok = tokenizers.Tokenizer(tokenizers.models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
tok.post_processor = processors.ByteLevel(trim_offsets=False)
tok.train_from_iterator(SENTENCES * 20, tokenizers.trainers.BpeTrainer(
    vocab_size=320, show_progress=False,
    special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
os.makedirs(INIT, exist_ok=True)
tok.save(os.path.join(INIT, "tokenizer.json"))
with open(os.path.join(INIT, "tokenizer_config.json"), "w") as f:
  json.dump({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
             "chat_template": CHAT_TEMPLATE}, f)

cfg = QwenConfig.from_preset(
    "tiny", vocab_size=384, eos_token_id=tok.token_to_id("<|im_end|>"),
    pad_token_id=tok.token_to_id("<|endoftext|>"))
checkpoint.save_hf_checkpoint(INIT, cfg, train_step.init_params(cfg, 0))
print(sorted(os.listdir(INIT)))

# %% [markdown]
# ## The data
# One conversation per line, in the `messages` format of chat APIs. A line
# with `{"text": ...}` instead trains on all of its tokens; `.txt` files
# are read as documents. Every line is checked before any weight loads: a
# malformed one stops the run with one error naming `file:line`.

# %%
DATA = os.path.join(ROOT, "chats.jsonl")
QA = [("What is the capital of France?", "Paris."),
      ("What is two plus two?", "Four."),
      ("Which planet is the largest?", "Jupiter."),
      ("Hello!", "Hello! How can I help you today?")]
with open(DATA, "w") as f:
  for _ in range(8):
    for q, a in QA:
      f.write(json.dumps({"messages": [{"role": "user", "content": q},
                                       {"role": "assistant",
                                        "content": a}]}) + "\n")

# %% [markdown]
# ## The run
# The same as
# `python -m experiments.train --config=experiments/configs/finetune.py
# --config.init_checkpoint=INIT --config.data.path=DATA
# --config.lora_rank=8 --workdir=WORKDIR --export_hf=OUT`.
# The loss is on the assistant tokens only (found by rendering the
# template). Every `eval_every` steps the run writes the held-out loss and
# greedy completions of held-out prompts to `WORKDIR/evals/`, and
# TensorBoard events to `WORKDIR/tensorboard/`.

# %%
from experiments import train as train_script
from experiments.configs import finetune as finetune_config

config = finetune_config.get_config()
config.init_checkpoint = INIT
config.data.path = DATA
config.data.eval_fraction = 0.125
config.lora_rank = 8
config.base_dtype = "float32"   # "auto": bfloat16 base weights for LoRA
config.model.remat_policy = "none"
config.eval_every = 20
config.eval.samples = 2
config.eval.max_new_tokens = 8
config.train.update(batch_size=4, seq_len=128, num_steps=40,
                    learning_rate=1e-2, warmup_steps=4, log_every=5,
                    checkpoint_every=20)
WORKDIR = os.path.join(ROOT, "run")
OUT = os.path.join(ROOT, "merged")
summary = train_script.run(config, WORKDIR, export_hf=OUT)
print(train_script.format_summary(summary))

# %% [markdown]
# ## What the run wrote
# The held-out evaluations (loss, perplexity, samples with their
# references), the loss plot, and the adapter (PEFT's layout: it loads onto
# the base checkpoint with transformers' PEFT integration).

# %%
for s in summary["eval"]["samples"]:
  print(repr(s["prompt"][-40:]), "->", repr(s["completion"]),
        "| reference", repr(s["reference"]))
print(sorted(os.listdir(WORKDIR)))
print(sorted(os.listdir(os.path.join(WORKDIR, "adapter"))))
try:
  from IPython.display import Image, display
  display(Image(os.path.join(WORKDIR, "loss.png")))
except ImportError:
  print("loss plot:", os.path.join(WORKDIR, "loss.png"))

# %% [markdown]
# ## The merged checkpoint
# `--export_hf` merged the adapters into the weights and copied the
# tokenizer: a plain transformers checkpoint, here reloaded with qwen_jax
# to answer a training question.

# %%
import numpy as np

from qwen_jax import generate
from qwen_jax.tokenizer import load_tokenizer

cfg2, params = checkpoint.load_hf_checkpoint(OUT)
tok2 = load_tokenizer(OUT)
prompt = tok2.apply_chat_template(
    [{"role": "user", "content": "What is two plus two?"}],
    add_generation_prompt=True)
new = generate(cfg2, params, np.asarray([prompt]), max_new_tokens=6,
               stop_tokens=[tok2.eos_token_id])
print(repr(tok2.decode(np.asarray(new)[0], skip_special_tokens=True)))
