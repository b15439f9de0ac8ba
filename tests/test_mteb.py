"""MTEB's own retrieval evaluation (the floor tier installs mteb: `make test-floor`) of our Encoder and of a
Retriever (query encoder + ScaNN index), through `eval.mteb_adapter`, gives the nDCG@10 `scalingnote eval`
gives, on a SciFact subset read locally; and MTEB reads the result file `eval --output` writes."""

import json
import os
import pathlib

import pytest

from helpers import BEIR, run_cli
from scalingnote_jax.artifacts import store
from scalingnote_jax.data import beir
from scalingnote_jax.eval.mteb_adapter import MTEBEncoder, MTEBRetriever, beir_task
from scalingnote_jax.index.index import Index
from scalingnote_jax.serve.retriever import Retriever

pytestmark = pytest.mark.floor
mteb = pytest.importorskip("mteb", reason="MTEB interop runs in the floor tier (make test-floor)")

# Distinct query and document prompts (a title joined by our template, not MTEB's "title text"), so that a
# side encoded with the other's prompt, or a title passed the wrong way, changes the scores.
TOWER = {"pooling": "mean", "append_eos": False, "projection_dim": None, "projection_bias": False, "normalize": True,
         "max_length": 64, "query_prompt": "query: {text}", "document_prompt": "passage: {title}. {text}"}


def write_scifact_subset(root: str, num_queries: int = 40, num_docs: int = 300, self_docs: int = 5) -> str:
  """The first `num_queries` test queries of SciFact, every document judged for them and others up to
  `num_docs`, plus, ArguAna-style, a document with the id and text of each of the first `self_docs` queries
  (it would be found first were it not dropped, as BEIR and MTEB's ignore_identical_ids drop it)."""
  full = beir.load_beir(os.path.join(BEIR, "scifact"), "test")
  qrels = dict(list(full.qrels.items())[:num_queries])
  judged = {d for j in qrels.values() for d in j}
  others = [d for d in full.corpus if d not in judged][:num_docs - len(judged)]
  corpus = {d: full.corpus[d] for d in full.corpus if d in judged or d in others}
  corpus.update({q: {"title": "", "text": full.queries[q]} for q in list(qrels)[:self_docs]})
  return beir.write_beir(beir.Dataset(corpus, {q: full.queries[q] for q in qrels}, qrels), root, "test")


@pytest.fixture(scope="module")
def scifact(tmp_path_factory, minilm_dir):
  """(BEIR dir, the encoder folder, `scalingnote eval`'s JSON line, its --output dir, its embedding store)."""
  root = tmp_path_factory.mktemp("mteb")
  data = write_scifact_subset(str(root / "scifact_subset"))
  model = root / "minilm_prompted"  # all-MiniLM-L6-v2 with the prompts and length above
  model.mkdir()
  for name in os.listdir(minilm_dir):
    os.symlink(os.path.join(minilm_dir, name), model / name)
  (model / "scalingnote_tower.json").write_text(json.dumps(TOWER))
  out, emb = str(root / "results"), str(root / "embeddings")
  line = run_cli("eval", "--checkpoint", str(model), "--data", data, "--backend", "scann", "--embeddings", emb,
                 "--output", out).stdout
  return data, str(model), json.loads(line), out, emb


@pytest.fixture(scope="module")
def encoder(scifact):
  return MTEBEncoder.from_checkpoint(scifact[1])  # what `eval --checkpoint` takes


def mteb_ndcg(model, task, cache_dir) -> float:
  """MTEB's evaluation of `model` on `task` (results written under cache_dir, nothing downloaded): nDCG@10."""
  result = mteb.evaluate(model, task, cache=mteb.ResultCache(cache_dir), show_progress_bar=False, co2_tracker=False)
  assert not result.exceptions
  return result.task_results[0].scores["test"][0]["ndcg_at_10"]


def test_mteb_scores_our_encoder_as_scalingnote_eval_does(scifact, encoder, tmp_path):
  data, _, ours, _, _ = scifact
  ndcg = mteb_ndcg(encoder, beir_task(data), tmp_path)
  assert ndcg == pytest.approx(ours["ndcg_at_10"], abs=1e-4)
  assert 0.3 < ndcg < 0.95  # a real retrieval, not two equally broken ones


def test_mteb_searches_a_retriever_as_scalingnote_eval_does(scifact, encoder, tmp_path):
  data, _, ours, _, emb = scifact
  doc_ids, d_NxD = store.load_embeddings(emb)  # the LLM documents of a bundle; here MiniLM's, as eval wrote them
  model = MTEBRetriever(Retriever(encoder.query_encoder, Index.build(d_NxD, doc_ids, backend="scann")))
  assert mteb_ndcg(model, beir_task(data), tmp_path) == pytest.approx(ours["ndcg_at_10"], abs=1e-4)
  # a task over other documents: refused, naming them (the retriever cannot encode documents)
  smaller = write_scifact_subset(str(tmp_path / "smaller"), num_docs=200)
  with pytest.raises(ValueError, match=r"100 indexed documents are not in the task's corpus"):
    mteb.evaluate(model, beir_task(smaller), cache=None, show_progress_bar=False, co2_tracker=False)


def test_mteb_reads_the_result_eval_output_writes(scifact):
  data, _, ours, out, _ = scifact
  result = mteb.TaskResult.from_disk(pathlib.Path(out, "scifact_subset.json"))  # named as MTEB names it
  assert result.task_name == "scifact_subset" and result.dataset_revision == beir_task(data).metadata.revision
  assert result.get_score() == ours["ndcg_at_10"]  # the main score: nDCG@10
