"""Readers for BEIR directories (`corpus.jsonl`, `queries.jsonl`, `qrels/<split>.tsv`) and for training
JSONL (`{"query_id", "query", "positive_ids", "negative_ids"}`). Bad lines are errors naming file:line."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re

from scalingnote_jax.data.synthetic import Dataset


class DataError(ValueError):
  """A malformed input line: the message starts with file:line."""


@dataclasses.dataclass
class TrainExample:
  query_id: str
  query: str
  positive_ids: list[str]
  negative_ids: list[str]


def utf8_lines(path: str):
  """(line number, text) of each line of a file; bytes that are not UTF-8 are an error naming file:line."""
  if not os.path.exists(path):
    raise DataError(f"{path}: no such file")
  with open(path, "rb") as f:
    for lineno, raw in enumerate(f, 1):
      try:
        yield lineno, raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise DataError(f"{path}:{lineno}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})") from None


def read_jsonl(path: str):
  for lineno, line in utf8_lines(path):
    if not line.strip():
      continue
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
      raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
    if "\\ud" in line.lower():  # a \uXXXX surrogate escape: valid only as a pair (no tokenizer takes a lone one)
      try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
      except UnicodeEncodeError:
        raise DataError(f"{path}:{lineno}: a string holds a lone surrogate (\\ud800-\\udfff escape without "
                        "its pair): not Unicode text") from None
    yield lineno, obj


def field(obj: dict, key: str, where: str, *, kind=str, allow_empty=False):
  if key not in obj:
    raise DataError(f"{where}: missing field {key!r}")
  value = obj[key]
  if kind is str and isinstance(value, int) and not isinstance(value, bool):
    value = str(value)  # numeric ids are common in BEIR files
  if not isinstance(value, kind):
    raise DataError(f"{where}: field {key!r} must be {kind.__name__}, got {type(value).__name__}")
  if not allow_empty and not value:
    raise DataError(f"{where}: field {key!r} is empty")
  return value


def _by_id(path: str, kind: str, parse) -> dict:
  """{_id: parse(obj, where)} over a JSONL file; duplicate ids are errors."""
  out = {}
  for lineno, obj in read_jsonl(path):
    where = f"{path}:{lineno}"
    key = field(obj, "_id", where)
    if any(ch.isspace() for ch in key):
      raise DataError(f"{where}: {kind} id {key!r} contains whitespace, which TREC run files cannot hold")
    if key in out:
      raise DataError(f"{where}: duplicate {kind} id {key!r}")
    out[key] = parse(obj, where)
  return out


def _document(obj: dict, where: str) -> dict[str, str]:
  title = str(obj.get("title") or "")
  return {"title": title, "text": field(obj, "text", where, allow_empty=bool(title))}  # a title alone will do


def load_corpus(path: str) -> dict[str, dict[str, str]]:
  return _by_id(path, "document", _document)


def load_queries(path: str) -> dict[str, str]:
  return _by_id(path, "query", lambda obj, where: field(obj, "text", where))


def load_qrels(path: str, *, query_ids=None, doc_ids=None, unknown: str = "error",
               skipped: list | None = None) -> dict[str, dict[str, int]]:
  """qrels TSV (header `query-id corpus-id score`). Pairs naming ids outside `query_ids` / `doc_ids` raise
  (`unknown="error"`) or are dropped (`unknown="skip"`, for evaluation where BEIR reports them; each dropped
  pair is appended to `skipped` as "file:line: unknown document id 'x'")."""
  qrels: dict[str, dict[str, int]] = {}
  first_line = {}  # (query, document) -> the line that judged it first: a repeat must agree with it
  for lineno, line in utf8_lines(path):
    row = next(csv.reader([line], delimiter="\t"), [])
    if not row or (lineno == 1 and row[0] == "query-id"):
      continue
    where = f"{path}:{lineno}"
    if len(row) < 3:
      raise DataError(f"{where}: expected 3 tab-separated columns (query-id, corpus-id, score), got {len(row)}")
    qid, doc_id, score = row[0], row[1], row[2]
    try:
      value = float(score)
    except ValueError:
      raise DataError(f"{where}: score {score!r} is not a number") from None
    if not value.is_integer():  # nan, inf and 0.6 alike: relevance grades are integers
      raise DataError(f"{where}: score {score!r} is not an integer relevance grade")
    grade = int(value)
    bad = ("query", qid) if query_ids is not None and qid not in query_ids else (
        ("document", doc_id) if doc_ids is not None and doc_id not in doc_ids else None)
    if bad and unknown == "error":
      raise DataError(f"{where}: unknown {bad[0]} id {bad[1]!r}")
    if bad:
      if skipped is not None:
        skipped.append(f"{where}: unknown {bad[0]} id {bad[1]!r}")
      continue
    judged = qrels.setdefault(qid, {})
    if doc_id in judged and judged[doc_id] != grade:
      raise DataError(f"{where}: ({qid!r}, {doc_id!r}) judged again with grade {grade} (first line: "
                      f"{first_line[qid, doc_id]}, grade {judged[doc_id]})")
    judged[doc_id] = grade
    first_line.setdefault((qid, doc_id), lineno)
  return qrels


def load_beir(directory: str, split: str, *, unknown: str = "error", skipped: list | None = None) -> Dataset:
  """The split's queries (those its qrels name), the whole corpus and the split's qrels."""
  corpus = load_corpus(os.path.join(directory, "corpus.jsonl"))
  queries = load_queries(os.path.join(directory, "queries.jsonl"))
  qrels = load_qrels(os.path.join(directory, "qrels", f"{split}.tsv"), query_ids=queries, doc_ids=corpus,
                     unknown=unknown, skipped=skipped)
  return Dataset(corpus, {q: queries[q] for q in qrels}, qrels)


# A sentence ends at . ! or ? followed by space and a capital letter: a heuristic that keeps "p = 0.016" and
# "(n = 17)" inside their sentence, enough for choosing which sentences of an abstract to keep.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def one_line(text: str) -> str:
  """`text` stripped, its line breaks made spaces: one line of a query log (other spacing kept, as tokenized)."""
  return re.sub(r"\s*[\r\n]+\s*", " ", text.strip())


def last_sentences(text: str, n: int, *, min_words: int = 5, max_words: int = 60) -> list[str]:
  """The last `n` sentences of `text` among those of `min_words`..`max_words` words, each `one_line`."""
  sentences = [one_line(s) for s in _SENTENCE_END.split(text)]
  return [s for s in sentences if min_words <= len(s.split()) <= max_words][-n:] if n > 0 else []


QUERY_LOG_SOURCES = ("titles", "conclusions")


def corpus_query_log(corpus: dict[str, dict[str, str]], sources: str) -> list[str]:
  """Query-like texts from the corpus itself, an unlabelled query log for distillation: `sources` joined by "+"
  from "titles" (each document's title) and "conclusions" (the last two sentences of each abstract, where
  papers state their findings: SciFact's claims are such findings), each source in corpus order."""
  texts = []
  for source in sources.split("+"):
    if source not in QUERY_LOG_SOURCES:
      raise ValueError(f"data.query_log={sources!r}: {source!r} is not one of {'/'.join(QUERY_LOG_SOURCES)} "
                       "(join them with '+'), and not a file")
    for doc in corpus.values():
      if source == "titles":
        texts += [t] if (t := one_line(doc["title"])) else []
      else:
        texts += last_sentences(doc["text"], 2)
  return texts


def examples_from_qrels(data: Dataset) -> list[TrainExample]:
  """One training example per query with its relevant documents (grade > 0) and no mined negatives."""
  out = []
  for qid, judged in data.qrels.items():
    positives = [d for d, g in judged.items() if g > 0]
    if positives:
      out.append(TrainExample(qid, data.queries[qid], positives, []))
  return out


def load_train_jsonl(path: str, corpus: dict) -> list[TrainExample]:
  """Training examples with hard negatives. Negatives that are also positives are dropped, never used."""
  out = []
  for lineno, obj in read_jsonl(path):
    where = f"{path}:{lineno}"
    ex = TrainExample(field(obj, "query_id", where), field(obj, "query", where),
                      [str(x) for x in field(obj, "positive_ids", where, kind=list)],
                      [str(x) for x in field(obj, "negative_ids", where, kind=list, allow_empty=True)])
    for doc_id in ex.positive_ids + ex.negative_ids:
      if doc_id not in corpus:
        raise DataError(f"{where}: unknown document id {doc_id!r}")
    positives = set(ex.positive_ids)
    ex.negative_ids = [d for d in ex.negative_ids if d not in positives]
    out.append(ex)
  return out


def write_train_jsonl(path: str, examples: list[TrainExample]) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for ex in examples:
      f.write(json.dumps(dataclasses.asdict(ex)) + "\n")
  os.replace(tmp, path)


def write_beir(data: Dataset, directory: str, split: str) -> str:
  """Writes a dataset as a BEIR directory (e.g. the synthetic corpus, for tools that take BEIR_DIR)."""
  os.makedirs(os.path.join(directory, "qrels"), exist_ok=True)
  with open(os.path.join(directory, "corpus.jsonl"), "w", encoding="utf-8") as f:
    for doc_id, doc in data.corpus.items():
      f.write(json.dumps({"_id": doc_id, "title": doc.get("title", ""), "text": doc["text"]}) + "\n")
  with open(os.path.join(directory, "queries.jsonl"), "w", encoding="utf-8") as f:
    for qid, text in data.queries.items():
      f.write(json.dumps({"_id": qid, "text": text}) + "\n")
  with open(os.path.join(directory, "qrels", f"{split}.tsv"), "w", encoding="utf-8") as f:
    f.write("query-id\tcorpus-id\tscore\n")
    for qid, judged in data.qrels.items():
      f.writelines(f"{qid}\t{doc_id}\t{grade}\n" for doc_id, grade in judged.items())
  return directory
