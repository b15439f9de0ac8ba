"""Stage 2 on BEIR SciFact: a student from MiniLM's first layers distilled from a SciFact Stage 1 teacher.

  scalingnote distill --config configs/distill_scifact.py --workdir runs/scifact_student \\
      --config.teacher=runs/scifact_minilm_mined --config.data.query_files="('runs/scifact_titles.txt',)"

SciFact has only 809 training queries; its 5,183 document titles are claims much like its queries, so
BENCHMARKS.md gives them as an unlabelled query log (a text file, one per line). The held-out split of the
teacher (SciFact test, 300 queries) is searched over the whole corpus at every evaluation.
"""

from scalingnote_jax.configs.distill_tiny import get_config as tiny


def get_config(variant: str = ""):
  c = tiny()
  c.student.num_layers = 2
  c.tower.max_length = 64
  c.data.update(dict(unlabelled_per_doc=0, query_len=48))  # SciFact claims: median 21 tokens, 99% <= 48
  c.num_steps = 1000
  c.batch_size = 64
  c.optim.update(dict(lr=1e-3, warmup_steps=50))
  c.eval.update(dict(every=500, batch_size=64))
  c.checkpoint.every = 500
  if variant == "smoke":
    c.num_steps, c.eval.every = 4, 0
  elif variant:
    raise ValueError(f"configs/distill_scifact.py: unknown variant {variant!r} (known: smoke)")
  return c
