"""Stage 1 production layout: Qwen2.5-7B dual towers, FSDP x tensor parallel, bf16 compute with fp32
master weights, rematerialised blocks and GradCache chunks.

Point it at the real checkpoint (a HF directory; tokenizer from the same directory):
  scalingnote train --config configs/qwen2_5_7b.py --workdir gs://.../run \\
      --config.model.init=/path/to/Qwen2.5-7B --config.data.path=/path/to/beir/msmarco
Without `model.init` the towers are random with Qwen2.5-7B's exact shapes (for ahead-of-time compilation
and memory planning).

Variants: `:h100x8` (one host, 8 GPUs: fsdp 8), `:v5e256` (TPU v5e-256: fsdp over all 256 chips, 8 GradCache
chunks: 5.3 GiB per chip compiled, where 4 chunks need 17.5 GiB; data 16 x fsdp 16 can never fit: the state
and gradients alone are 16.5 GiB of a v5e's 16).
"""

from scalingnote_jax.config import stage1_defaults

QWEN2_5_7B = dict(kind="llm", vocab_size=152064, hidden_size=3584, num_layers=28, num_heads=28, num_kv_heads=4,
                  head_dim=128, intermediate_size=18944, rope_theta=1e6, rms_norm_eps=1e-6, attention_bias=True,
                  tie_word_embeddings=False, model_type="qwen2", eos_token_id=151643)


def get_config(variant: str = ""):
  c = stage1_defaults()
  c.model.init = "random"
  c.model.tokenizer = ""  # set to the checkpoint directory
  c.model.backbone = QWEN2_5_7B
  c.model.dtype, c.model.param_dtype, c.model.remat = "bfloat16", "float32", True
  c.tower.update(dict(pooling="last", append_eos=True, max_length=512, query_prompt="Query: {text}",
                      document_prompt="Title: {title}\nContent: {text}"))
  c.data.update(dict(source="beir", path="", train_split="train", val_split="dev", n_neg=7, query_len=64,
                     doc_len=256))
  c.batch_size = 1024  # global queries per step: 1024 x 8 documents of negatives for each query
  c.chunks = 8
  c.num_steps = 20_000
  c.optim.update(dict(lr=1e-5, warmup_steps=500, weight_decay=0.01, clip_norm=1.0))
  c.loss.update(dict(temperature=0.02, learn_temperature=False, symmetric=False))
  c.eval.update(dict(every=1000, max_docs=100_000, batch_size=256))
  c.checkpoint.update(dict(every=500, keep=3))
  c.mesh = {"": (1, -1, 1), "h100x8": (1, 8, 1), "v5e256": (1, 256, 1)}.get(variant)
  if variant == "v5e256":
    c.chunks = 8  # 4 chunks (one query per chip per chunk) compile to 17.5 GiB per chip: over a v5e's 16
  if c.mesh is None:
    raise ValueError(f"configs/qwen2_5_7b.py: unknown variant {variant!r} (known: h100x8, v5e256)")
  return c
