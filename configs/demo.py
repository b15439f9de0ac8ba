"""The embedded default: the built-in synthetic corpus, encoded by the LLM document tower (SmolLM2-135M,
shipped as a pip package) and the small BERT query tower (all-MiniLM-L6-v2). No download at run time.

  scalingnote demo --config configs/demo.py          # ~1-2 minutes on a 2-core CPU
  scalingnote demo --config configs/demo.py:smoke    # seconds
"""

from ml_collections import ConfigDict


def get_config(variant: str = "") -> ConfigDict:
  c = ConfigDict()
  c.seed = 0
  c.num_docs = 256  # synthetic documents; one query each
  c.document_tower = "SmolLM2-135M-Instruct-Q4_1"  # HF dir, .gguf file or packaged name
  c.query_tower = "all-MiniLM-L6-v2"
  c.batch_size = 32
  c.max_length = 128
  c.dtype = "float32"  # compute dtype; "bfloat16" on accelerators
  if variant == "smoke":
    c.num_docs = 32
  elif variant:
    raise ValueError(f"configs/demo.py: unknown variant {variant!r} (known: smoke)")
  return c
