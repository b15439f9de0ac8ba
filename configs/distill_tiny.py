"""Stage 2 on the synthetic corpus: MiniLM's first layer distilled from a Stage 1 teacher (configs/tiny.py); the
test and demo config (~1 minute on 2 cores).

  scalingnote train --config configs/tiny.py --workdir /tmp/tiny
  scalingnote distill --config configs/distill_tiny.py --config.teacher=/tmp/tiny --workdir /tmp/tiny-student
"""

from ml_collections import ConfigDict

from scalingnote_jax.sharding import DEFAULT_RULES


def get_config(variant: str = ""):
  c = ConfigDict()
  c.teacher = ""  # a Stage 1 workdir (required)
  c.mesh = (-1, 1, 1)  # (data, fsdp, tensor)
  c.rules = DEFAULT_RULES
  c.num_steps = 150
  c.batch_size = 32  # global queries per step
  c.log_every = 50
  # init: a BERT checkpoint (HF dir or packaged name) whose first num_layers layers are kept (0 = all), or
  # "random" with `backbone` (kind="bert", ...) and `tokenizer`.
  c.student = ConfigDict(dict(init="all-MiniLM-L6-v2", num_layers=1, tokenizer="", seed=0, dtype="float32",
                              param_dtype="float32", remat=False, backbone=ConfigDict()))
  # Unset fields follow the checkpoint (sentence-transformers pooling); projection: "auto" = to the teacher's
  # width when the student's differs, an int, or None.
  c.tower = ConfigDict(dict(projection="auto", max_length=64, query_prompt="{text}", pooling=None))
  # loss = mse_weight * |s - t|^2 + cosine_weight * (1 - cos(s, t)); s normalised first with normalized_mse
  c.loss = ConfigDict(dict(mse_weight=1.0, cosine_weight=1.0, normalized_mse=False))
  c.optim = ConfigDict(dict(lr=2e-3, warmup_steps=20, schedule="cosine", final_lr_fraction=0.1, weight_decay=0.01,
                            clip_norm=1.0, b1=0.9, b2=0.999))
  # Training queries = the teacher's labelled ones + query_files (.txt, or .jsonl with "text"/"query") +,
  # for a synthetic-corpus teacher, unlabelled_per_doc generated queries per document.
  c.data = ConfigDict(dict(query_files=(), unlabelled_per_doc=4, query_len=24, seed=0))  # its queries: <= 20 tokens
  c.teacher_cache = ""  # where the teacher's embeddings are cached ("" = WORKDIR/teacher)
  c.teacher_encode = ConfigDict(dict(batch_size=64, chunk_size=4096))
  c.checkpoint = ConfigDict(dict(every=150, keep=2))
  c.eval = ConfigDict(dict(every=150, at_start=True, max_docs=0, seed=0, batch_size=64))
  if variant == "smoke":
    c.num_steps, c.eval.every, c.data.unlabelled_per_doc = 4, 0, 0
  elif variant:
    raise ValueError(f"configs/distill_tiny.py: unknown variant {variant!r} (known: smoke)")
  return c
