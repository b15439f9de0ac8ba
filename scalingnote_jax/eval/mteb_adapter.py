"""MTEB (https://github.com/embeddings-benchmark/mteb, 2.x) on our models: an `Encoder` (or a Stage 1 workdir's
two towers) as MTEB's encoder protocol, a `Retriever` (a serving bundle: student + ScaNN index) as its search
protocol, and a local BEIR directory as an MTEB retrieval task (no download).

  import mteb
  from scalingnote_jax.eval.mteb_adapter import MTEBEncoder, MTEBRetriever, beir_task

  task = beir_task("../shared/data/beir/scifact")                     # split "test"; task name "scifact"
  result = mteb.evaluate(MTEBEncoder.from_checkpoint("all-MiniLM-L6-v2"), task, cache=None)
  result = mteb.evaluate(MTEBRetriever.from_bundle("runs/demo/bundles/L1"), beir_task("runs/demo/data"), cache=None)
  result.task_results[0].get_score()                                  # nDCG@10, as `scalingnote eval` reports it

mteb is imported inside the functions that need it: the package never requires it (`pip install .[interop]`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

from scalingnote_jax.encoder import Encoder, towers
from scalingnote_jax.eval import evaluate
from scalingnote_jax.serve.retriever import Retriever

ORGANIZATION = "scalingnote-jax"  # MTEB model names are "organization/model"


def _model_meta(name: str, revision: str, encoder: Encoder):
  """MTEB's ModelMeta of a model whose queries `encoder` embeds. Similarity: the inner product our indexes
  compute, which is the cosine for towers that normalise."""
  from mteb.models.model_meta import ModelMeta

  params = jax.tree.leaves(nnx.state(encoder.tower, nnx.Param))
  return ModelMeta(loader=None, name=f"{ORGANIZATION}/{name}", revision=revision, release_date=None, languages=None,
                   n_parameters=sum(int(np.size(x)) for x in params), memory_usage_mb=None,
                   max_tokens=encoder.cfg.max_length, embed_dim=encoder.dim, license=None, open_weights=None,
                   public_training_code=None, public_training_data=None, framework=["JAX"],
                   similarity_fn_name="cosine" if encoder.cfg.normalize else "dot",
                   use_instructions=encoder.cfg.query_prompt != "{text}", training_datasets=None)


class MTEBEncoder:
  """mteb's `EncoderProtocol` over a query encoder and a document encoder (one `Encoder` for both unless
  given two): prompt type query -> `encode_queries`, document -> `encode_documents` (title and text apart, so
  our document prompt joins them), none (symmetric tasks: STS, classification) -> the query encoder with no
  prompt, as sentence-transformers' `encode`."""

  def __init__(self, query_encoder: Encoder, document_encoder: Encoder | None = None, *, name: str | None = None):
    self.query_encoder, self.document_encoder = query_encoder, document_encoder or query_encoder
    fingerprints = f"{self.query_encoder.fingerprint}/{self.document_encoder.fingerprint}"
    self.revision = hashlib.sha256(fingerprints.encode()).hexdigest()[:16]  # what MTEB files results under
    self.name = name or f"encoder-{self.revision}"

  @classmethod
  def from_checkpoint(cls, checkpoint: str, step: int | None = None) -> MTEBEncoder:
    """What `scalingnote eval --checkpoint` evaluates: a Stage 1 workdir's two towers, or one HF dir / GGUF /
    packaged encoder for both sides."""
    q_enc, d_enc, _ = towers(checkpoint, step=step)
    return cls(q_enc, d_enc, name=os.path.basename(os.path.normpath(checkpoint)))

  @property
  def mteb_model_meta(self):
    return _model_meta(self.name, self.revision, self.query_encoder)

  def encode(self, inputs, *, task_metadata=None, hf_split=None, hf_subset=None, prompt_type=None,
             **kwargs) -> np.ndarray:
    """inputs: MTEB's DataLoader of batches ({"text": [...]}; a corpus's also has "body", its text without the
    title, and "title")."""
    from mteb.types import PromptType

    batch_size = kwargs.get("batch_size", 32)
    show = kwargs.get("show_progress_bar", False)
    batches = list(inputs)
    if prompt_type == PromptType.document:
      docs = []
      for b in batches:
        if "body" in b:  # MTEB's "text" is title + " " + text; our document prompt joins them itself
          titles = b.get("title") or [""] * len(b["body"])
          docs += [{"title": t, "text": x} for t, x in zip(titles, b["body"])]
        else:
          docs += list(b["text"])
      return self.document_encoder.encode_documents(docs, batch_size, show_progress=show)
    texts = [t for b in batches for t in b["text"]]
    if prompt_type == PromptType.query:
      return self.query_encoder.encode_queries(texts, batch_size, show_progress=show)
    return self.query_encoder.encode(texts, batch_size, show_progress=show)

  def similarity(self, embeddings1, embeddings2):
    from mteb.similarity_functions import dot_score

    return dot_score(embeddings1, embeddings2)  # what the index scores (the cosine when the towers normalise)

  def similarity_pairwise(self, embeddings1, embeddings2):
    from mteb.similarity_functions import pairwise_dot_score

    return pairwise_dot_score(embeddings1, embeddings2)


class MTEBRetriever:
  """mteb's `SearchProtocol` over a `Retriever`: its query encoder and its index, as `scalingnote eval
  --bundle` searches. A bundle holds the embeddings of the documents it was exported with and not the LLM
  document tower that made them, so `index` checks that the task's corpus is those documents, and encodes
  nothing."""

  def __init__(self, retriever: Retriever, *, name: str | None = None):
    self.retriever = retriever
    documents = retriever.manifest.get("documents", {}).get("fingerprint", "")
    ids = hashlib.sha256("\n".join(retriever.index.doc_ids).encode()).hexdigest()
    self.revision = hashlib.sha256(f"{retriever.encoder.fingerprint}/{documents}/{ids}".encode()).hexdigest()[:16]
    self.name = name or f"retriever-{self.revision}"

  @classmethod
  def from_bundle(cls, bundle: str) -> MTEBRetriever:
    return cls(Retriever.load(bundle), name=os.path.basename(os.path.normpath(bundle)))

  @property
  def mteb_model_meta(self):
    return _model_meta(self.name, self.revision, self.retriever.encoder)

  def index(self, corpus, *, task_metadata=None, hf_split=None, hf_subset=None, encode_kwargs=None, **kwargs) -> None:
    task_ids, indexed = set(corpus["id"]), set(self.retriever.index.doc_ids)
    if task_ids != indexed:
      missing, extra = sorted(task_ids - indexed), sorted(indexed - task_ids)
      name = getattr(task_metadata, "name", "the task")
      raise ValueError(f"{name}: the retriever searches its own indexed documents and cannot encode others (a "
                       f"bundle holds no document tower): {len(missing)} of the task's {len(task_ids)} documents are "
                       f"not indexed (e.g. {missing[:5]}), and {len(extra)} indexed documents are not in the task's "
                       f"corpus (e.g. {extra[:5]})")

  def search(self, queries, *, task_metadata=None, hf_split=None, hf_subset=None, top_k: int = 1000,
             encode_kwargs=None, top_ranked=None, **kwargs) -> dict[str, dict[str, float]]:
    if top_ranked is not None:
      raise NotImplementedError("MTEBRetriever: reranking tasks (given candidates per query) are not supported: "
                                "the retriever searches its whole index")
    qids, texts = list(queries["id"]), list(queries["text"])
    return self.retriever.search(texts, top_k).run(qids)


def beir_task(data_dir: str, split: str = "test", *, name: str | None = None, keep_self: bool = False,
              languages: Sequence[str] = evaluate.MTEB_LANGUAGES):
  """An MTEB retrieval task (an `AbsTaskRetrieval`) over a local BEIR directory, read by our reader
  (`evaluate.load_split`), so that MTEB and `scalingnote eval` see the same queries, documents and judgments;
  nothing is downloaded. Task name: `name`, else the directory's basename (the file `eval --output` writes);
  dataset revision: `evaluate.data_revision`. A document with the query's own id is dropped from its results:
  MTEB's `ignore_identical_ids`, which MTEB leaves off but for ArguAna-style tasks, is on here, as BEIR's own
  evaluation and `scalingnote eval` drop it (`keep_self`: kept, as `eval --keep-self`)."""
  from datasets import Dataset
  from mteb.abstasks.retrieval import AbsTaskRetrieval
  from mteb.abstasks.task_metadata import TaskMetadata

  data, _ = evaluate.load_split(data_dir, split)
  path = os.path.abspath(data_dir)
  task_metadata = TaskMetadata(name=name or evaluate.task_name(data_dir), type="Retrieval", category="t2t",
                               description=f"BEIR directory {path}, read locally", modalities=["text"],
                               dataset={"path": path, "revision": evaluate.data_revision(data_dir, split)},
                               eval_splits=[split], eval_langs=list(languages), main_score="ndcg_at_10")

  class LocalBEIRTask(AbsTaskRetrieval):
    metadata = task_metadata
    ignore_identical_ids = not keep_self

    def load_data(self, num_proc: int | None = None, **kwargs) -> None:
      corpus = Dataset.from_list([{"id": d, "title": doc.get("title") or "", "text": doc["text"]}
                                  for d, doc in data.corpus.items()])
      queries = Dataset.from_list([{"id": q, "text": text} for q, text in data.queries.items()])
      qrels = {q: dict(judged) for q, judged in data.qrels.items()}
      self.dataset = {"default": {split: {"corpus": corpus, "queries": queries, "relevant_docs": qrels,
                                          "top_ranked": None}}}
      self.data_loaded = True

  return LocalBEIRTask()
