"""A cross-encoder reranker on the synthetic corpus (or any BEIR directory): all-MiniLM-L6-v2's first 2 layers
with a score head, groups of 4 first-stage candidates, ListNet by default (`--config.loss=bce|ranknet`). The
test config: ~1 minute on 2 cores. Pairs are cut to 32 tokens: the synthetic queries name their document's
entity, which its title holds. (A BERT from scratch barely learns to match query and document in a few
hundred steps; a pretrained one does in tens.)

  scalingnote eval --checkpoint STAGE1_DIR --data BEIR_DIR --split train --save-run train.run
  scalingnote eval --checkpoint STAGE1_DIR --data BEIR_DIR --split test --save-run test.run
  scalingnote train-reranker --config configs/rerank_tiny.py --workdir /tmp/reranker \\
      --config.data.path=BEIR_DIR --config.data.train_run=train.run --config.data.val_run=test.run
  scalingnote rerank --model /tmp/reranker --data BEIR_DIR --run test.run --out reranked.run --top-k 10
  scalingnote eval --run reranked.run --data BEIR_DIR --split test
"""

from ml_collections import ConfigDict

from scalingnote_jax.sharding import DEFAULT_RULES


def get_config(variant: str = ""):
  c = ConfigDict()
  c.mesh = (-1, 1, 1)  # (data, fsdp, tensor)
  c.rules = DEFAULT_RULES
  c.loss = "listnet"  # bce (pointwise) | ranknet (pairwise) | listnet (listwise)
  c.num_steps = 50
  c.batch_size = 8  # global queries per step, each with a group of data.group_size pairs
  c.log_every = 10
  # init: a checkpoint (HF dir, GGUF or packaged name; its first num_layers layers, 0 = all) or "random" with
  # `backbone` (kind "bert" or "llm") and `tokenizer`.
  c.model = ConfigDict(dict(init="all-MiniLM-L6-v2", num_layers=2, tokenizer="", seed=0, dtype="float32",
                            param_dtype="float32", remat=False, backbone=ConfigDict()))
  # The pair's tokens: query prompt, then document prompt (cut longest-first to max_length); unset fields
  # follow the checkpoint. BERT scores from [CLS]; a decoder from its last token (pooling="last", append_eos).
  c.tower = ConfigDict(dict(pooling="cls", max_length=32, query_prompt="{text}", document_prompt="{title} {text}"))
  # First stage: "bm25" or a TREC run file per split; groups draw the others from each query's top_k.
  c.data = ConfigDict(dict(path="", train_split="train", val_split="test", train_run="bm25", val_run="bm25",
                           top_k=30, group_size=4, train_fraction=1.0, seed=0))
  c.optim = ConfigDict(dict(lr=5e-4, warmup_steps=5, schedule="cosine", final_lr_fraction=0.1, weight_decay=0.01,
                            clip_norm=1.0, b1=0.9, b2=0.999))
  c.checkpoint = ConfigDict(dict(every=25, keep=2))
  # Validation reranks each validation query's first-stage top_k.
  c.eval = ConfigDict(dict(every=50, at_start=False, top_k=10, batch_size=128))
  if variant == "smoke":
    c.num_steps, c.batch_size, c.log_every, c.checkpoint.every, c.eval.every = 4, 4, 2, 2, 4
  elif variant:
    raise ValueError(f"configs/rerank_tiny.py: unknown variant {variant!r} (known: smoke)")
  return c
