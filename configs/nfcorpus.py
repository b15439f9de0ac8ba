"""The whole pipeline on BEIR NFCorpus (3,633 medical documents; 2,590 training queries with graded qrels):
configs/scifact.py's models and stages on another corpus.

  scalingnote pipeline --config configs/nfcorpus.py --workdir runs/nfcorpus --config.data.path=BEIR/nfcorpus
"""

from scalingnote_jax.configs.scifact import get_config as scifact_config


def get_config(variant: str = ""):
  return scifact_config(variant, name="nfcorpus")
