"""Stage 1 on BEIR SciFact with both towers initialised from SmolLM2-135M-Instruct (the packaged Q4_1 GGUF,
dequantized), sized for a 2-core CPU: the embedding and lower 18 of 30 blocks frozen, their
hidden states of the corpus and queries cached once (`model.trunk_cache`, data/trunk.py), so a step runs the
12 blocks above; mean pooling.
A dev split (15% of the train queries) is held out to choose settings on; the test split is reported once.

  scalingnote train --config configs/scifact_smollm2.py --workdir runs/scifact_smollm2 \\
      --config.data.path=../shared/data/beir/scifact
  scalingnote train --config configs/scifact_smollm2.py:full ...   # every block trained (a GPU: BENCHMARKS.md)
"""

from scalingnote_jax.config import stage1_defaults


def get_config(variant: str = "", *, name: str = "scifact"):
  c = stage1_defaults()
  c.model.init = "SmolLM2-135M-Instruct-Q4_1"
  # SciFact dev (whole corpus, 300 steps): 24 frozen blocks 0.654, 18 frozen 0.732 (0.769 after a mining round,
  # 0.751 with 24); a step 4.6 s instead of 2.5 on 2 cores (BENCHMARKS.md). NFCorpus dev: 18 frozen 0.273 /
  # 0.279 / 0.297 at steps 100 / 200 / 300, against 24 frozen's 0.258 at step 300 (BM25 0.288).
  c.model.freeze_layers = 18
  c.model.trunk_cache = True
  # Mean pooling: an untrained decoder's last-token state barely depends on the text (SciFact test nDCG@10
  # 0.000 at step 0 with EOS pooling); the demo found mean pooling far better for small decoders.
  c.tower.update(dict(pooling="mean", append_eos=True, max_length=192, query_prompt="Query: {text}",
                      document_prompt="Title: {title}\nContent: {text}"))
  c.data.update(dict(source="beir", path=f"../shared/data/beir/{name}", train_split="train", val_split="train",
                     val_fraction=0.15, n_neg=0, query_len=64, doc_len=192, seed=0))
  if name == "nfcorpus":  # its own dev split (324 queries) instead of train queries held out
    c.data.val_split = "dev"
  c.batch_size = 16
  c.num_steps = 300
  c.optim.update(dict(lr=2e-4, warmup_steps=20, weight_decay=0.01))
  c.loss.temperature = 0.05
  # validation on the dev queries over the whole corpus: every document is in the trunk cache, so a pass runs
  # the trained blocks only (~5 min on 2 cores); 500 documents ranked 0.2-0.3 nDCG@10 too high
  c.eval.update(dict(every=100, batch_size=32, max_docs=0))
  c.checkpoint.update(dict(every=100, keep=3))
  if variant == "full":
    # The GPU recipe (BENCHMARKS.md, an H200: test nDCG@10 0.701): every block trained, last-token pooling
    # with EOS, lr 1e-4 (1e-5 for 100 steps left it at chance), all train queries, remat + GradCache for memory.
    c.model.freeze_layers, c.model.trunk_cache, c.model.remat, c.chunks = 0, False, True, 2
    c.tower.update(dict(pooling="last", max_length=256))
    c.data.update(dict(val_split="test", doc_len=192))
    c.optim.lr = 1e-4
    c.eval.update(dict(every=300, max_docs=0))
  elif variant == "smoke":
    c.num_steps, c.eval.every, c.eval.max_docs, c.batch_size = 2, 2, 200, 4
  elif variant:
    raise ValueError(f"configs/{name}_smollm2.py: unknown variant {variant!r} (known: full, smoke)")
  return c
