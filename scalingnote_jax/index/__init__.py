"""The document index for hard-negative mining and serving: exact inner product or ScaNN, one interface.

  index = Index.build(d_NxD, doc_ids, backend="scann")
  scores_QxK, ids = index.search(q_QxD, k=100)
  index.save(dir); index = Index.load(dir, expect_dim=256)
"""

from scalingnote_jax.index.exact import exact_search
from scalingnote_jax.index.index import (BACKENDS, BRUTE_FORCE_BELOW, FORMAT_VERSION, ExactIndex, Index,
                                         IndexFormatError, ScannIndex, load_index, scann_defaults)

__all__ = ["BACKENDS", "BRUTE_FORCE_BELOW", "FORMAT_VERSION", "ExactIndex", "Index", "IndexFormatError",
           "ScannIndex", "exact_search", "load_index", "scann_defaults"]
