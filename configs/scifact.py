"""The whole pipeline on BEIR SciFact: SmolLM2-135M towers as the teacher (configs/scifact_smollm2.py: the lower
18 blocks frozen with their states cached, sized for a 2-core CPU), MiniLM's first layers as the
directly-trained small dual tower and as the students, all-MiniLM-L6-v2 zero-shot and BM25 as references.
SciFact's 5,183 titles and its abstracts' last two sentences (claims and findings, like its queries) are the
students' unlabelled query log. The teacher and the baseline hold the same 15% of the train queries out as a
dev split; the report is on the test split.

  scalingnote pipeline --config configs/scifact.py --workdir runs/scifact --config.data.path=BEIR/scifact
  scalingnote pipeline --config configs/scifact.py:mined ...     # with a mining round (two more corpus passes)
  scalingnote pipeline --config configs/scifact.py:minilm --workdir runs/scifact_minilm   # a MiniLM teacher
"""

from ml_collections import ConfigDict

from scalingnote_jax.configs.distill_scifact import get_config as distill_config
from scalingnote_jax.configs.scifact_minilm import get_config as minilm_config
from scalingnote_jax.configs.scifact_smollm2 import get_config as smollm2_config


def get_config(variant: str = "", *, name: str = "scifact"):
  c = ConfigDict()
  # The students' unlabelled query log, texts of the corpus (data/beir.py `corpus_query_log`). The abstracts' last
  # two sentences beside the titles raised a 1-layer student's dev cosine to the teacher on SciFact 0.79 -> 0.80
  # (nDCG@10 0.683 -> 0.723 at 1,000 steps), on NFCorpus 0.80 -> 0.81 (nDCG@10 0.278 -> 0.282, Recall@100 kept
  # 91.6% -> 97.4%; BENCHMARKS.md).
  c.data = ConfigDict(dict(source="beir", path=f"../shared/data/beir/{name}", split="test",
                           query_log="titles+conclusions"))
  # variant "minilm": all-MiniLM-L6-v2 as the teacher, a stand-in that trains on a CPU
  # (configs/nfcorpus_smollm2.py's recipe for name "nfcorpus": its own dev split)
  c.teacher = minilm_config() if variant == "minilm" else smollm2_config(name=name)
  c.teacher.eval.every = c.teacher.num_steps
  # No mining round by default (num_steps 0): on 2 cores it costs a full-corpus pass of the teacher (~30 min)
  # and trunk states of most of the corpus; variant "mined" runs one.
  c.mining = ConfigDict(dict(range_min=10, range_max=100, num_negatives=8, sampling="top", seed=0, n_neg=1,
                             num_steps=150 if variant in ("mined", "minilm") else 0))
  c.baseline = minilm_config()
  c.baseline.model.num_layers = 2  # the students' size, trained end to end on the same examples
  c.baseline.data.update(dict(val_split=c.teacher.data.val_split, val_fraction=c.teacher.data.val_fraction))
  c.baseline.num_steps = c.teacher.num_steps + c.mining.num_steps
  c.baseline.optim.lr = 1e-4
  c.baseline.eval.every = c.baseline.num_steps
  c.student = distill_config()
  c.student_layers = (1, 2, 3)
  c.export = ConfigDict(dict(backend="scann"))
  c.eval = ConfigDict(dict(num_negatives=256, temperature=None, batch_size=64, zero_shot=("all-MiniLM-L6-v2",)))
  c.keep_all_checkpoints = False  # a finished training stage keeps its final checkpoint only (pipeline.py)
  if variant not in ("", "mined", "minilm"):
    raise ValueError(f"configs/{name}.py: unknown variant {variant!r} (known: mined, minilm)")
  return c
