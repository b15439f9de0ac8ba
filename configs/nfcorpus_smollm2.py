"""Stage 1 on BEIR NFCorpus (3,633 medical documents, 2,590 training queries with graded qrels) with both
towers from SmolLM2-135M-Instruct: configs/scifact_smollm2.py's recipe on another corpus, validated on
NFCorpus's own dev split.

  scalingnote train --config configs/nfcorpus_smollm2.py --workdir runs/nfcorpus_smollm2
"""

from scalingnote_jax.configs.scifact_smollm2 import get_config as scifact_config


def get_config(variant: str = ""):
  return scifact_config(variant, name="nfcorpus")
