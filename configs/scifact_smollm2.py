"""Stage 1 on BEIR SciFact (train qrels only) with both towers initialised from SmolLM2-135M-Instruct (the
packaged Q4_1 GGUF, dequantized): last-token pooling with EOS. Long on a CPU: run it in the background.

  scalingnote train --config configs/scifact_smollm2.py --workdir runs/scifact_smollm2 \\
      --config.data.path=../shared/data/beir/scifact
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from stage1_common import base  # noqa: E402


def get_config(variant: str = ""):
  c = base()
  c.model.init = "SmolLM2-135M-Instruct-Q4_1"
  c.model.remat = True
  c.tower.update(dict(pooling="last", append_eos=True, max_length=256, query_prompt="Query: {text}",
                      document_prompt="Title: {title}\nContent: {text}"))
  c.data.update(dict(source="beir", path="../shared/data/beir/scifact", train_split="train", val_split="test",
                     n_neg=0, query_len=64, doc_len=192, seed=0))
  c.batch_size = 16
  c.chunks = 2  # GradCache: activations of 8 queries + 8 documents at a time
  c.num_steps = 100
  c.optim.update(dict(lr=1e-5, warmup_steps=10, weight_decay=0.01))
  c.loss.temperature = 0.05
  c.eval.update(dict(every=100, batch_size=32, max_docs=0))
  c.checkpoint.every = 25
  if variant == "smoke":
    c.num_steps, c.eval.every, c.eval.max_docs, c.batch_size, c.chunks = 2, 2, 200, 4, 1
  elif variant:
    raise ValueError(f"configs/scifact_smollm2.py: unknown variant {variant!r} (known: smoke)")
  return c
