"""Stage 1 on the synthetic corpus with a tiny random decoder (SmolLM2's tokenizer): the test config.

  scalingnote train --config configs/tiny.py --workdir /tmp/tiny
"""

from scalingnote_jax.config import stage1_defaults


def get_config(variant: str = ""):
  c = stage1_defaults()
  c.model.tokenizer = "SmolLM2-135M-Instruct-Q4_1"
  c.model.backbone = dict(kind="llm", vocab_size=49152, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                          head_dim=16, intermediate_size=128, tie_word_embeddings=True, eos_token_id=2)
  # The document tower gets a seed of its own: two unrelated random towers retrieve at chance (Recall@10 ~0.01;
  # with identical ones, shared tokens alone give 0.28), so what the tests measure is learnt.
  c.model.doc_seed = 1
  c.tower.max_length = 64
  c.optim.lr = 2e-3
  c.num_steps = 200
  c.batch_size = 32
  c.data.num_docs = 1024
  c.data.queries_per_doc = 1
  c.data.val_fraction = 0.125  # 128 held-out queries over all 1024 documents
  c.eval.every = 100
  if variant == "smoke":
    c.num_steps, c.data.num_docs, c.eval.every = 4, 32, 0
  elif variant:
    raise ValueError(f"configs/tiny.py: unknown variant {variant!r} (known: smoke)")
  return c
