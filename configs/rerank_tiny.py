"""A cross-encoder reranker on the synthetic corpus (or any BEIR directory): all-MiniLM-L6-v2's first 2 layers
with a score head, groups of 4 first-stage candidates, ListNet by default (`--config.loss=bce|ranknet`). The
test config: ~40 s on 2 cores. Pairs are cut to 24 tokens: the synthetic queries name their document's
entity, which its title holds. (A BERT from scratch barely learns to match query and document in a few
hundred steps; a pretrained one does in tens.)

  scalingnote eval --checkpoint STAGE1_DIR --data BEIR_DIR --split train --save-run train.run
  scalingnote eval --checkpoint STAGE1_DIR --data BEIR_DIR --split test --save-run test.run
  scalingnote train-reranker --config configs/rerank_tiny.py --workdir /tmp/reranker \\
      --config.data.path=BEIR_DIR --config.data.train_run=train.run --config.data.val_run=test.run
  scalingnote rerank --checkpoint /tmp/reranker --data BEIR_DIR --run test.run --out reranked.run --top-k 10
  scalingnote eval --run reranked.run --data BEIR_DIR --split test
"""

from scalingnote_jax.config import rerank_defaults


def get_config(variant: str = ""):
  c = rerank_defaults()  # the defaults are this test-size run
  if variant == "smoke":
    c.num_steps, c.batch_size, c.log_every, c.checkpoint.every, c.eval.every = 4, 4, 2, 2, 4
  elif variant == "demo":
    # README's walkthrough over `make demo`'s teacher, whose queries describe their documents in other words:
    # whole pairs (64 tokens; 24 cut the qualities the queries ask about) and a head on the mean of the tokens
    # (MiniLM was trained mean-pooled; from its [CLS] 150 steps reach 0.55 against the first stage's 0.69).
    c.tower.update(dict(pooling="mean", max_length=64))
    c.num_steps, c.eval.fuse = 150, (0.5,)
  elif variant:
    raise ValueError(f"configs/rerank_tiny.py: unknown variant {variant!r} (known: smoke, demo)")
  return c
