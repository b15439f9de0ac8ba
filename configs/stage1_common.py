"""Fields shared by the Stage 1 configs (imported by them; not a config on its own)."""

from ml_collections import ConfigDict

from scalingnote_jax.sharding import DEFAULT_RULES


def base() -> ConfigDict:
  c = ConfigDict()
  c.mesh = (-1, 1, 1)  # (data, fsdp, tensor); -1 = the remaining devices
  c.rules = DEFAULT_RULES
  c.num_steps = 100
  c.batch_size = 32  # global queries per step
  c.chunks = 1  # GradCache chunks per step (activation memory of batch_size / chunks)
  c.tied = False  # one set of parameters for both towers
  c.log_every = 10
  # init: "random" (with backbone), a HF dir / GGUF / packaged name (its first num_layers layers; 0 = all), or
  # a Stage 1 workdir (a further round from the towers it trained). Optional `model.doc_seed` (random init
  # only): the document tower's own seed; unset, both towers start from identical weights. (Optional, not a
  # field here, so that finished runs' stage hashes stay valid.)
  c.model = ConfigDict(dict(init="random", num_layers=0, tokenizer="", seed=0, dtype="float32",
                            param_dtype="float32", remat=False, backbone=ConfigDict()))
  c.tower = ConfigDict(dict(pooling="last", append_eos=True, projection_dim=None, normalize=True, max_length=128,
                            query_prompt="{text}", document_prompt="{title}\n{text}"))
  c.loss = ConfigDict(dict(temperature=0.05, learn_temperature=False, symmetric=False))
  c.optim = ConfigDict(dict(lr=1e-4, warmup_steps=10, schedule="cosine", final_lr_fraction=0.1, weight_decay=0.01,
                            clip_norm=1.0, b1=0.9, b2=0.999))
  c.data = ConfigDict(dict(source="synthetic", path="", train_split="train", val_split="", train_jsonl="",
                           num_docs=256, queries_per_doc=2, val_fraction=0.25, n_neg_candidates=8, seed=0,
                           n_neg=1, query_len=32, doc_len=64, train_fraction=1.0))
  c.checkpoint = ConfigDict(dict(every=50, keep=3))
  # at_start: also evaluate the initial towers (step 0); off when that number is already known.
  c.eval = ConfigDict(dict(every=50, at_start=True, num_negatives=256, max_docs=0, seed=0, batch_size=64))
  return c
