"""A built-in synthetic retrieval corpus: no download, deterministic from a seed.

Each topic has nouns and attributes (with synonyms). A document describes one invented entity of a topic by
two attributes; a query asks about that entity with paraphrase noise (attribute synonyms, dropped words,
shuffled order). Other documents of the same topic share vocabulary and act as hard distractors, so a good
retriever must match the entity and attributes, not only the topic.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# topic -> (nouns, {attribute: synonyms})
TOPICS = {
    "astronomy": (["comet", "nebula", "exoplanet", "pulsar"],
                  {"orbit": ["trajectory", "path"], "brightness": ["luminosity", "magnitude"],
                   "mass": ["weight", "heft"], "temperature": ["heat", "warmth"], "distance": ["range", "remoteness"]}),
    "medicine": (["enzyme", "vaccine", "antibody", "hormone"],
                 {"dosage": ["dose", "amount"], "toxicity": ["harm", "poisonousness"],
                  "half-life": ["decay time", "persistence"], "efficacy": ["effectiveness", "potency"],
                  "side effects": ["adverse reactions", "complications"]}),
    "geology": (["volcano", "glacier", "fault line", "mineral"],
                {"age": ["era", "antiquity"], "hardness": ["toughness", "rigidity"],
                 "composition": ["makeup", "constitution"], "erosion": ["wear", "weathering"],
                 "elevation": ["height", "altitude"]}),
    "cooking": (["sauce", "pastry", "stew", "bread"],
                {"flavour": ["taste", "savour"], "texture": ["consistency", "mouthfeel"],
                 "cooking time": ["baking duration", "prep time"], "spiciness": ["heat level", "pungency"],
                 "origin": ["provenance", "homeland"]}),
    "software": (["compiler", "database", "scheduler", "protocol"],
                 {"latency": ["delay", "response time"], "throughput": ["bandwidth", "capacity"],
                  "memory usage": ["footprint", "ram consumption"], "license": ["terms of use", "licensing"],
                  "security": ["safety", "hardening"]}),
    "finance": (["bond", "index fund", "currency", "derivative"],
                {"yield": ["return", "payout"], "volatility": ["risk", "swings"], "liquidity": ["tradability", "marketability"],
                 "fees": ["charges", "costs"], "maturity": ["term", "expiry"]}),
    "ecology": (["wetland", "coral reef", "forest", "grassland"],
                {"biodiversity": ["species richness", "variety of life"], "rainfall": ["precipitation", "rain"],
                 "soil quality": ["soil health", "fertility"], "pollution": ["contamination", "toxins"],
                 "area": ["extent", "size"]}),
    "music": (["symphony", "ballad", "opera", "sonata"],
              {"tempo": ["speed", "pace"], "harmony": ["chords", "consonance"], "composer": ["author", "creator"],
               "instrumentation": ["orchestration", "instruments"], "premiere": ["debut", "first performance"]}),
}
SYLLABLES = ["ka", "lo", "mi", "ren", "tor", "va", "zel", "qua", "bri", "dun", "fe", "gro", "hal", "jin", "nor",
             "pel", "sar", "tu", "vek", "wim"]
QUALITIES = ["high", "low", "unusual", "moderate", "extreme", "stable", "variable", "remarkable"]
SENTENCES = [
    "{E} is a {noun} studied for its {q1} {a1}.",
    "Reports describe the {a1} of {E} as {q1}, while its {a2} is {q2}.",
    "The {a2} of {E} was measured as {q2} in several surveys.",
    "Unlike other examples of {noun}s, {E} combines {q1} {a1} with {q2} {a2}.",
    "Experts on {topic} often cite {E} when discussing {a2}.",
]
QUERIES = [
    "what is the {a1} of {E}",
    "{E} {a2}",
    "{noun} {E} with {q1} {a1} and {q2} {a2}",
    "how {q2} is the {a2} of the {noun} {E}",
]


@dataclasses.dataclass
class Dataset:
  """BEIR-shaped: corpus {doc_id: {"title", "text"}}, queries {qid: text}, qrels {qid: {doc_id: grade}};
  `unlabelled`: more query texts about the same documents without judgements (a query log)."""
  corpus: dict[str, dict[str, str]]
  queries: dict[str, str]
  qrels: dict[str, dict[str, int]]
  unlabelled: list[str] = dataclasses.field(default_factory=list)


def entity_name(rng: np.random.Generator) -> str:
  return "".join(rng.choice(SYLLABLES, size=int(rng.integers(2, 4)))).capitalize() + f"-{rng.integers(1, 99)}"


def generate(num_docs: int = 200, queries_per_doc: int = 1, seed: int = 0, noise: float = 0.3,
             unlabelled_per_doc: int = 0) -> Dataset:
  """`num_docs` documents spread over the topics; `noise` is the per-word paraphrase probability. The
  `unlabelled_per_doc` extra queries come from their own random stream: the rest does not depend on it."""
  rng = np.random.default_rng(seed)
  topics = list(TOPICS)
  corpus, queries, qrels, seen, all_slots = {}, {}, {}, set(), []
  for i in range(num_docs):
    topic = topics[i % len(topics)]
    nouns, attrs = TOPICS[topic]
    name = entity_name(rng)
    while name in seen:
      name = entity_name(rng)
    seen.add(name)
    a1, a2 = rng.choice(list(attrs), size=2, replace=False)
    slots = dict(E=name, noun=rng.choice(nouns), topic=topic, a1=a1, a2=a2, q1=rng.choice(QUALITIES),
                 q2=rng.choice(QUALITIES))
    sentences = [SENTENCES[k].format(**slots) for k in sorted(rng.choice(len(SENTENCES), 3, replace=False))]
    doc_id = f"d{i}"
    corpus[doc_id] = {"title": f"{name} ({topic})", "text": " ".join(sentences)}
    for j in range(queries_per_doc):
      qid = f"q{i}_{j}"
      queries[qid] = paraphrase(rng.choice(QUERIES).format(**slots), attrs, rng, noise)
      qrels[qid] = {doc_id: 1}
    all_slots.append((slots, attrs))
  log_rng = np.random.default_rng([seed, 1])
  unlabelled = [paraphrase(log_rng.choice(QUERIES).format(**slots), attrs, log_rng, noise)
                for slots, attrs in all_slots for _ in range(unlabelled_per_doc)]
  return Dataset(corpus, queries, qrels, unlabelled)


def paraphrase(query: str, attrs: dict[str, list[str]], rng: np.random.Generator, noise: float) -> str:
  """Swaps attributes for synonyms, drops filler words, sometimes moves the entity to the front, and writes
  the entity the way people type it: lower case, digits apart ('Halfeva-31' -> 'halfeva 31'). For a cased
  subword tokenizer (SmolLM2's) the query and its document then share no entity token, so a dense model
  learns the match; BM25's lower-casing word tokenizer matches them directly and is near perfect here."""
  for attr, synonyms in attrs.items():
    if attr in query and rng.random() < noise * 2:
      query = query.replace(attr, str(rng.choice(synonyms)))
  words = [w for w in query.split() if not (w in ("the", "of", "is", "and", "a") and rng.random() < noise)]
  entity = [w for w in words if "-" in w and w[0].isupper()]
  if entity and rng.random() < noise:
    words = entity + [w for w in words if w not in entity]
  return " ".join(w.lower().replace("-", " ") if w in entity else w for w in words)


def topic_of(doc: dict[str, str]) -> str:
  """Documents are titled 'Entity (topic)'."""
  return doc["title"].rsplit("(", 1)[1].rstrip(")")


def with_topic_negatives(examples, corpus: dict[str, dict[str, str]], k: int, seed: int):
  """Gives each example up to `k` hard negatives: other documents of its positive's topic."""
  rng = np.random.default_rng(seed)
  by_topic: dict[str, list[str]] = {}
  for doc_id, doc in corpus.items():
    by_topic.setdefault(topic_of(doc), []).append(doc_id)
  for ex in examples:
    pool = [d for d in by_topic[topic_of(corpus[ex.positive_ids[0]])] if d not in ex.positive_ids]
    ex.negative_ids = [str(d) for d in rng.choice(pool, size=min(k, len(pool)), replace=False)]
  return examples


def clustered_embeddings(n: int, d: int, q: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(documents [n, d], queries [q, d]): unit vectors with the structure of text embeddings, for index tests
  and benchmarks. A power-law spectrum (variance of direction j ~ 1/(j+1)), 100 topics, clusters of ~100
  documents around topic + offset, and document noise larger than the cluster offsets, so that a query's
  neighbours straddle clusters. Queries are drawn like documents, not taken from the corpus."""
  rng = np.random.default_rng(seed)
  scale = np.sqrt(1.0 / (1.0 + np.arange(d)))
  scale = (scale / np.linalg.norm(scale)).astype(np.float32)
  topics = rng.standard_normal((100, d), dtype=np.float32) * scale
  c = max(1, n // 100)
  centres = topics[rng.integers(0, 100, c)] + rng.standard_normal((c, d), dtype=np.float32) * scale

  def draw(m, r):
    out = np.empty((m, d), np.float32)
    for s in range(0, m, 100_000):  # in slices: no 1M x D temporaries besides the result
      e = min(m, s + 100_000)
      x = centres[r.integers(0, c, e - s)] + 1.5 * r.standard_normal((e - s, d), dtype=np.float32) * scale
      out[s:e] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out

  return draw(n, rng), draw(q, np.random.default_rng(seed + 1))
