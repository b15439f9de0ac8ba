"""Stage 1 on BEIR SciFact (train qrels only) with both towers initialised from SmolLM2-135M-Instruct (the
packaged Q4_1 GGUF, dequantized): last-token pooling with EOS. Long on a CPU: run it in the background.

  scalingnote train --config configs/scifact_smollm2.py --workdir runs/scifact_smollm2 \\
      --config.data.path=../shared/data/beir/scifact
"""

from scalingnote_jax.config import stage1_defaults


def get_config(variant: str = ""):
  c = stage1_defaults()
  c.model.init = "SmolLM2-135M-Instruct-Q4_1"
  c.model.remat = True
  c.tower.update(dict(pooling="last", append_eos=True, max_length=256, query_prompt="Query: {text}",
                      document_prompt="Title: {title}\nContent: {text}"))
  c.data.update(dict(source="beir", path="../shared/data/beir/scifact", train_split="train", val_split="test",
                     n_neg=0, query_len=64, doc_len=192, seed=0))
  c.batch_size = 16
  c.chunks = 2  # GradCache: activations of 8 queries + 8 documents at a time
  # An untrained decoder's last-token state barely depends on the text (SciFact test nDCG@10 0.000 at step 0):
  # lr 1e-5 for 100 steps left it at chance (0.001); lr 1e-4 for 300 steps (~6 epochs) reaches 0.701
  # (BENCHMARKS.md, measured on an H200).
  c.num_steps = 300
  c.optim.update(dict(lr=1e-4, warmup_steps=20, weight_decay=0.01))
  c.loss.temperature = 0.05
  c.eval.update(dict(every=300, batch_size=32, max_docs=0))
  c.checkpoint.every = 100
  if variant == "smoke":
    c.num_steps, c.eval.every, c.eval.max_docs, c.batch_size, c.chunks = 2, 2, 200, 4, 1
  elif variant:
    raise ValueError(f"configs/scifact_smollm2.py: unknown variant {variant!r} (known: smoke)")
  return c
