"""A built-in synthetic retrieval corpus: no download, deterministic from a seed.

Each topic has nouns and attributes (with synonyms). A document describes one invented entity of a topic by
two attributes and their qualities. Two styles of query:
- "named": a query asks about the entity by its name, with paraphrase noise (attribute synonyms, dropped words,
  shuffled order). Other documents of the same topic share vocabulary and act as hard distractors, so a good
  retriever must match the entity and attributes, not only the topic. The name is in both: BM25 is near perfect.
- "described": a query never names the entity; it asks for the kind of thing with those two qualities, each
  word (the noun, the attributes, the qualities) in other words with probability `noise` ("which neutron star
  has unusual distance and great heft" for a pulsar of high mass). No two documents share noun, attributes and
  qualities, so every query has one answer, but it shares few words with it: BM25 finds what is written alike,
  a model that knows (or learns) the synonyms and what goes with what finds the rest.
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
# Other words for the nouns and qualities (the attributes' are in TOPICS): what "described" queries say.
NOUN_SYNONYMS = {
    "comet": ["icy wanderer", "tailed body"], "nebula": ["gas cloud", "dust cloud"],
    "exoplanet": ["alien world", "distant planet"], "pulsar": ["spinning star", "neutron star"],
    "enzyme": ["catalyst protein", "biocatalyst"], "vaccine": ["immunisation", "inoculation"],
    "antibody": ["immunoglobulin", "immune protein"], "hormone": ["chemical messenger", "endocrine signal"],
    "volcano": ["eruptive mountain", "lava vent"], "glacier": ["ice sheet", "ice river"],
    "fault line": ["tectonic fracture", "crustal rift"], "mineral": ["crystal", "ore"],
    "sauce": ["dressing", "gravy"], "pastry": ["baked dough", "tart"], "stew": ["casserole", "braise"],
    "bread": ["loaf", "baked loaf"], "compiler": ["code translator", "build tool"],
    "database": ["data store", "record system"], "scheduler": ["job planner", "task dispatcher"],
    "protocol": ["network standard", "wire format"], "bond": ["debt security", "fixed income note"],
    "index fund": ["passive fund", "tracker fund"], "currency": ["money", "legal tender"],
    "derivative": ["financial contract", "option contract"], "wetland": ["marsh", "swamp"],
    "coral reef": ["reef system", "coral colony"], "forest": ["woodland", "woods"], "grassland": ["prairie", "steppe"],
    "symphony": ["orchestral work", "orchestral piece"], "ballad": ["love song", "slow song"],
    "opera": ["sung drama", "musical drama"], "sonata": ["instrumental piece", "chamber piece"],
}
QUALITY_SYNONYMS = {
    "high": ["elevated", "great"], "low": ["small", "reduced"], "unusual": ["atypical", "odd"],
    "moderate": ["medium", "average"], "extreme": ["intense", "severe"], "stable": ["steady", "constant"],
    "variable": ["changing", "fluctuating"], "remarkable": ["notable", "striking"],
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
DESCRIBED_QUERIES = [
    "a {noun} with {q1} {a1} and {q2} {a2}",
    "which {noun} has {q1} {a1} and {q2} {a2}",
    "{noun} whose {a1} is {q1} and whose {a2} is {q2}",
    "{q2} {a2} and {q1} {a1} in a {noun}",
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
             unlabelled_per_doc: int = 0, style: str = "named") -> Dataset:
  """`num_docs` documents spread over the topics; queries of `style` "named" (`noise`: the per-word
  paraphrase probability) or "described" (`noise`: the probability that each of its words is a synonym). The
  `unlabelled_per_doc` extra queries come from their own random stream: the rest does not depend on it."""
  if style not in ("named", "described"):
    raise ValueError(f"data.style={style!r}: expected 'named' or 'described'")
  ask = paraphrase if style == "named" else describe
  rng = np.random.default_rng(seed)
  topics = list(TOPICS)
  corpus, queries, qrels, seen, kinds, all_slots = {}, {}, {}, set(), set(), []
  for i in range(num_docs):
    topic = topics[i % len(topics)]
    nouns, attrs = TOPICS[topic]
    name = entity_name(rng)
    while name in seen:
      name = entity_name(rng)
    seen.add(name)
    while True:  # "described": no two documents of the same kind and qualities, so each query has one answer
      a1, a2 = rng.choice(list(attrs), size=2, replace=False)
      slots = dict(E=name, noun=str(rng.choice(nouns)), topic=topic, a1=str(a1), a2=str(a2),
                   q1=str(rng.choice(QUALITIES)), q2=str(rng.choice(QUALITIES)))
      kind = (slots["noun"], frozenset([(slots["a1"], slots["q1"]), (slots["a2"], slots["q2"])]))
      if style == "named" or kind not in kinds:
        kinds.add(kind)
        break
    if style == "named":
      sentences = [SENTENCES[k].format(**slots) for k in sorted(rng.choice(len(SENTENCES), 3, replace=False))]
    else:  # every document states its kind and both qualities, then one more sentence
      sentences = [f"{name} is a {slots['noun']} studied in {topic}.", SENTENCES[1].format(**slots),
                   SENTENCES[int(rng.choice([0, 2, 3, 4]))].format(**slots)]
    doc_id = f"d{i}"
    corpus[doc_id] = {"title": f"{name} ({topic})", "text": " ".join(sentences)}
    for j in range(queries_per_doc):
      qid = f"q{i}_{j}"
      queries[qid] = ask(slots, attrs, rng, noise)
      qrels[qid] = {doc_id: 1}
    all_slots.append((slots, attrs))
  log_rng = np.random.default_rng([seed, 1])
  unlabelled = [ask(slots, attrs, log_rng, noise) for slots, attrs in all_slots for _ in range(unlabelled_per_doc)]
  return Dataset(corpus, queries, qrels, unlabelled)


def describe(slots: dict, attrs: dict[str, list[str]], rng: np.random.Generator, noise: float) -> str:
  """A "described" query: the entity's kind and two qualities, each word a synonym with probability `noise`."""
  words = dict(slots)
  for key, table in (("noun", NOUN_SYNONYMS), ("a1", attrs), ("a2", attrs), ("q1", QUALITY_SYNONYMS),
                     ("q2", QUALITY_SYNONYMS)):
    if rng.random() < noise:
      words[key] = str(rng.choice(table[slots[key]]))
  return str(rng.choice(DESCRIBED_QUERIES)).format(**words)


def paraphrase(slots: dict, attrs: dict[str, list[str]], rng: np.random.Generator, noise: float) -> str:
  """Swaps attributes for synonyms, drops filler words, sometimes moves the entity to the front, and writes
  the entity the way people type it: lower case, digits apart ('Halfeva-31' -> 'halfeva 31'). For a cased
  subword tokenizer (SmolLM2's) the query and its document then share no entity token, so a dense model
  learns the match; BM25's lower-casing word tokenizer matches them directly and is near perfect here."""
  query = str(rng.choice(QUERIES)).format(**slots)
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
