"""Stage 1 on BEIR SciFact (train qrels only) with both towers initialised from all-MiniLM-L6-v2; test-split
metrics before (step 0) and after training, over the full corpus.

  scalingnote train --config configs/scifact_minilm.py --workdir runs/scifact_minilm \\
      --config.data.path=../shared/data/beir/scifact
"""

from scalingnote_jax.config import stage1_defaults


def get_config(variant: str = ""):
  c = stage1_defaults()
  c.model.init = "all-MiniLM-L6-v2"
  c.tower.update(dict(pooling="mean", append_eos=False, max_length=256, query_prompt="{text}",
                      document_prompt="{title} {text}"))
  c.data.update(dict(source="beir", path="../shared/data/beir/scifact", train_split="train", val_split="test",
                     n_neg=0, query_len=64, doc_len=256, seed=0))
  c.batch_size = 32
  c.num_steps = 150  # ~6 epochs of the 809 training queries
  c.optim.update(dict(lr=3e-5, warmup_steps=15, weight_decay=0.01))
  c.loss.temperature = 0.05
  c.eval.update(dict(every=150, batch_size=64, max_docs=0))
  c.checkpoint.every = 50
  if variant == "smoke":
    c.num_steps, c.eval.every, c.eval.max_docs, c.batch_size = 4, 4, 500, 8
  elif variant:
    raise ValueError(f"configs/scifact_minilm.py: unknown variant {variant!r} (known: smoke)")
  return c
