"""The HTTP retrieval service over a fake retriever: results equal a direct search, every input limit answers
4xx naming the field, a failing search answers 500 and the service goes on, concurrent requests share encoder
calls, /metrics counts them in Prometheus' format, /openapi.json describes what /search answers, and a real
uvicorn server under 16 concurrent clients answers everything correctly (p50/p99/QPS printed)."""

import concurrent.futures
import contextlib
import hashlib
import inspect
import json
import select
import socket
import sys
import threading
import time
import types

import httpx
import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from scalingnote_jax import cli
from scalingnote_jax.index.hits import Hits
from scalingnote_jax.serve import http

NUM_DOCS, DIM = 50, 16


class FakeRetriever:
  """Exact inner product over NUM_DOCS random unit vectors; a query's vector is seeded by a hash of its text.

  Each query is scored on its own, so results do not depend on which batch it was in. Records every call."""

  def __init__(self, delay_s: float = 0.0):
    rng = np.random.default_rng(0)
    d_NxD = rng.normal(size=(NUM_DOCS, DIM))
    self.d_NxD = (d_NxD / np.linalg.norm(d_NxD, axis=1, keepdims=True)).astype(np.float32)
    self.ids = [f"doc{i}" for i in range(NUM_DOCS)]
    self.num_docs = NUM_DOCS
    self.delay_s = delay_s
    self.calls = []  # (number of queries, k) per search call
    self.fail_next = False
    self.thread_ids = set()
    self.gate = threading.Event()  # search waits until it is set (held open: tests of requests in flight)
    self.gate.set()

  def expected(self, queries: list[str], k: int) -> Hits:
    ids, scores = [], []
    for q in queries:
      seed = int.from_bytes(hashlib.sha256(q.encode()).digest()[:8], "little")
      s_N = self.d_NxD @ np.random.default_rng(seed).normal(size=DIM).astype(np.float32)
      top = np.argsort(-s_N, kind="stable")[:k]
      ids.append([self.ids[j] for j in top])
      scores.append(s_N[top])
    return Hits(ids, np.asarray(scores, dtype=np.float32).reshape(len(queries), k))

  def search(self, queries: list[str], k: int) -> Hits:
    self.calls.append((len(queries), k))
    self.thread_ids.add(threading.get_ident())
    time.sleep(self.delay_s)  # an encoder call takes time: concurrent requests pile up meanwhile
    self.gate.wait()
    if self.fail_next:
      self.fail_next = False
      raise RuntimeError("encoder fell over")
    return self.expected(queries, k)

  @property
  def batch_sizes(self) -> list[int]:
    return [n for n, _ in self.calls]


def results_of(fake: FakeRetriever, queries: list[str], k: int) -> list[list[dict]]:
  """The /search "results" a direct call to the fake gives."""
  hits = fake.expected(queries, k)
  return [[{"id": i, "score": float(s)} for i, s in zip(row_ids, row_scores)]
          for row_ids, row_scores in zip(hits.ids, hits.scores)]


def queries_for(i: int, n: int) -> list[str]:
  return [f"query {i}.{j} about dense retrieval" for j in range(n)]


@pytest.fixture
def fake():
  return FakeRetriever()


LIMITS = http.Limits(max_queries=8, max_query_chars=100, max_k=100)  # max_k > NUM_DOCS: both k checks reachable


@pytest.fixture
def client(fake):
  with TestClient(http.create_app(fake, LIMITS)) as c:  # `with` runs the lifespan: the batcher
    yield c


def test_results_equal_a_direct_search_in_order(client, fake):
  queries = queries_for(0, 5)
  r = client.post("/search", json={"queries": queries, "k": 7})
  assert r.status_code == 200, r.text
  assert r.json()["results"] == results_of(fake, queries, 7)  # scores exact: float32 -> JSON -> float
  r = client.post("/search", json={"queries": queries[:1]})  # k defaults to 10
  assert r.json()["results"] == results_of(fake, queries[:1], http.DEFAULT_K)
  assert client.get("/healthz").json() == {"status": "ok", "num_docs": NUM_DOCS}


def test_different_k_in_one_batch_are_truncated_per_request():
  fake = FakeRetriever()
  # The batch goes out as soon as it holds max_batch queries; the long window makes sure all four join it.
  app = http.create_app(fake, http.Limits(max_batch=4, max_wait_ms=5000))
  ks = [1, 3, 10, 5]
  with TestClient(app) as client, concurrent.futures.ThreadPoolExecutor(4) as pool:
    t0 = time.perf_counter()
    responses = list(pool.map(lambda i: client.post("/search", json={"queries": [f"q{i}"], "k": ks[i]}), range(4)))
    assert time.perf_counter() - t0 < 4  # a full batch does not wait for the window to close
  assert fake.calls == [(4, 10)]  # one encoder call, with the largest k
  for i, r in enumerate(responses):
    assert r.json()["results"] == results_of(fake, [f"q{i}"], ks[i])


def test_a_request_larger_than_max_batch_is_split():
  fake = FakeRetriever()
  with TestClient(http.create_app(fake, http.Limits(max_batch=4, max_wait_ms=0))) as client:
    queries = queries_for(1, 10)
    r = client.post("/search", json={"queries": queries, "k": 3})
  assert r.json()["results"] == results_of(fake, queries, 3)
  assert fake.batch_sizes == [4, 4, 2]


BAD = [  # (body, status, words the error must contain)
    (b"{not json", 400, ["body", "JSON"]),
    (b"\xff\xfe", 400, ["body", "JSON"]),
    (b"[" * 5000, 400, ["body", "JSON"]),  # nested past the recursion limit
    (b"[" * 100_000, 413, ["body", "bytes"]),
    (b'["a"]', 400, ["body", "object"]),
    ({"k": 3}, 422, ["queries", "missing"]),
    ({"queries": "what is dense retrieval"}, 422, ["queries", "list"]),
    ({"queries": []}, 422, ["queries", "empty"]),
    ({"queries": ["a", 3]}, 422, ["queries[1]", "string"]),
    ({"queries": ["a", " "]}, 422, ["queries[1]", "empty"]),
    ({"queries": ["a"] * 9}, 413, ["queries", "limit of 8"]),
    ({"queries": ["a", "x" * 101]}, 413, ["queries[1]", "limit of 100"]),
    ({"queries": ["a"], "k": 0}, 422, ["k", "positive integer"]),
    ({"queries": ["a"], "k": -3}, 422, ["k", "positive integer"]),
    ({"queries": ["a"], "k": "5"}, 422, ["k", "positive integer"]),
    ({"queries": ["a"], "k": 2.5}, 422, ["k", "positive integer"]),
    ({"queries": ["a"], "k": True}, 422, ["k", "positive integer"]),
    ({"queries": ["a"], "k": 101}, 422, ["k", "limit of 100"]),
    ({"queries": ["a"], "k": 51}, 422, ["k", "50 documents"]),
    ({"queries": ["a"], "topk": 5}, 422, ["topk"]),
    (b'{"queries": ["a", "\\ud800"]}', 422, ["queries[1]", "lone surrogate"]),  # valid JSON, not Unicode text
]


@pytest.mark.parametrize("body,status,words", BAD, ids=[f"{s}-{i}" for i, (_, s, _) in enumerate(BAD)])
def test_bad_input_answers_4xx_naming_the_field(client, fake, body, status, words):
  r = client.post("/search", content=body) if isinstance(body, bytes) else client.post("/search", json=body)
  assert r.status_code == status, r.text
  error = r.json()["error"]
  assert all(w in error for w in words), error
  assert fake.calls == []  # refused before any search
  r = client.post("/search", json={"queries": ["still there?"], "k": 2})  # the service still answers
  assert r.json()["results"] == results_of(fake, ["still there?"], 2)
  counts = client.get("/metrics.json").json()["requests"]
  assert counts == {"total": 2, "by_status": {"200": 1, str(status): 1}}


def test_unknown_routes_and_methods_answer_json(client):
  r = client.get("/search")
  assert r.status_code == 405 and "GET /search" in r.json()["error"]
  r = client.get("/nope")
  assert r.status_code == 404 and "/nope" in r.json()["error"]


def test_a_failing_search_answers_500_and_the_service_goes_on(client, fake):
  fake.fail_next = True
  r = client.post("/search", json={"queries": ["boom"]})
  assert r.status_code == 500
  assert "encoder fell over" in r.json()["error"]
  r = client.post("/search", json={"queries": ["after"], "k": 4})
  assert r.status_code == 200 and r.json()["results"] == results_of(fake, ["after"], 4)
  assert client.get("/metrics.json").json()["requests"]["by_status"] == {"200": 1, "500": 1}


def test_results_an_index_could_not_fill_are_left_out():
  """ScaNN pads a row it cannot fill with id None and score -inf: the answer lists only real documents."""
  class Short(FakeRetriever):
    def search(self, queries, k):
      hits = super().search(queries, k)
      return Hits([row[:2] + [None] * (k - 2) for row in hits.ids],
                  np.where(np.arange(k) < 2, hits.scores, -np.inf).astype(np.float32))

  fake = Short()
  with TestClient(http.create_app(fake)) as client:
    r = client.post("/search", json={"queries": ["a", "b"], "k": 5})
  assert r.status_code == 200 and r.json()["results"] == [row[:2] for row in results_of(fake, ["a", "b"], 5)]


def test_a_request_that_fails_inside_a_batch_fails_alone():
  """A query the retriever cannot take (as a tokenizer that raises) is batched with others: only its request
  is answered 500; every other request of that batch gets its results."""
  class Picky(FakeRetriever):
    def search(self, queries, k):
      if any("poison" in q for q in queries):
        self.calls.append((len(queries), k))
        raise TypeError("the tokenizer cannot take this")
      return super().search(queries, k)

  fake = Picky(delay_s=0.02)
  texts = [f"poison {i}" if i % 4 == 0 else f"q{i}" for i in range(16)]
  with TestClient(http.create_app(fake, http.Limits(max_wait_ms=5.0))) as client, \
      concurrent.futures.ThreadPoolExecutor(16) as pool:
    responses = list(pool.map(lambda t: client.post("/search", json={"queries": [t], "k": 3}), texts))
  assert max(n for n, _ in fake.calls) > 1  # requests were batched (and a batch held a poisoned one)
  for text, r in zip(texts, responses):
    if text.startswith("poison"):
      assert r.status_code == 500 and "tokenizer cannot take this" in r.json()["error"], r.text
    else:
      assert r.status_code == 200 and r.json()["results"] == results_of(fake, [text], 3), text


def test_concurrent_requests_share_encoder_calls():
  fake = FakeRetriever(delay_s=0.02)
  with TestClient(http.create_app(fake, http.Limits(max_wait_ms=2.0))) as client, \
      concurrent.futures.ThreadPoolExecutor(16) as pool:
    responses = list(pool.map(lambda i: client.post("/search", json={"queries": [f"q{i}"], "k": 5}), range(16)))
    metrics = client.get("/metrics.json").json()
  assert [r.json()["results"] for r in responses] == [results_of(fake, [f"q{i}"], 5) for i in range(16)]
  assert sum(fake.batch_sizes) == 16
  assert len(fake.batch_sizes) < 16 and max(fake.batch_sizes) > 1, fake.batch_sizes
  assert len(fake.thread_ids) == 1  # one worker thread: search need not be thread-safe
  assert metrics["batches"] == len(fake.batch_sizes)
  assert metrics["mean_batch_size"] == pytest.approx(16 / len(fake.batch_sizes))
  assert metrics["queries"] == 16 and metrics["requests"]["total"] == 16


def prometheus_samples(text: str) -> dict:
  """{(sample name, sorted label items): value} of a Prometheus text exposition."""
  return {(s.name, tuple(sorted(s.labels.items()))): s.value
          for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_are_prometheus_text_with_a_registry_per_app(client, fake):
  client.post("/search", json={"queries": queries_for(2, 3), "k": 2})
  client.post("/search", json={"queries": ["one more"]})
  client.post("/search", json={"queries": []})  # 422
  r = client.get("/metrics")
  assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
  samples = prometheus_samples(r.text)
  assert samples[("scalingnote_search_requests_total", (("code", "200"),))] == 2
  assert samples[("scalingnote_search_requests_total", (("code", "422"),))] == 1
  assert samples[("scalingnote_search_queries_total", ())] == 4
  assert samples[("scalingnote_encoder_batch_size_count", ())] == len(fake.calls) > 0
  assert samples[("scalingnote_encoder_batch_size_sum", ())] == sum(fake.batch_sizes) == 4
  assert samples[("scalingnote_encoder_batch_size_bucket", (("le", "+Inf"),))] == len(fake.calls)
  assert samples[("scalingnote_search_request_duration_seconds_count", ())] == 3
  assert ("process_cpu_seconds_total", ()) in samples
  report = client.get("/metrics.json").json()  # the same counts, for a person with curl
  assert report["requests"] == {"total": 3, "by_status": {"200": 2, "422": 1}}
  assert report["queries"] == 4 and report["batches"] == len(fake.calls) and report["latency_ms"]["window"] == 3
  r = client.get("/metrics", headers={"accept": "application/openmetrics-text; version=1.0.0"})
  assert r.headers["content-type"].startswith("application/openmetrics-text") and r.text.endswith("# EOF\n")

  with TestClient(http.create_app(FakeRetriever(), LIMITS)) as other:  # a second app in this process: its own counts
    samples = prometheus_samples(other.get("/metrics").text)
  assert samples[("scalingnote_search_queries_total", ())] == 0
  assert not any(name == "scalingnote_search_requests_total" for name, _ in samples)


def conforms(value, schema: dict, schemas: dict) -> bool:
  """Whether `value` fits a JSON schema made of what pydantic writes for these models ($ref, anyOf, const, object,
  array, string, number, integer, null): jsonschema is not a dependency."""
  if "$ref" in schema:
    return conforms(value, schemas[schema["$ref"].rsplit("/", 1)[1]], schemas)
  if "anyOf" in schema:
    return any(conforms(value, option, schemas) for option in schema["anyOf"])
  if "const" in schema and value != schema["const"]:
    return False
  kind = schema["type"]
  if kind == "object":
    properties, extra = schema.get("properties", {}), schema.get("additionalProperties", True)
    return isinstance(value, dict) and set(schema.get("required", [])) <= set(value) and all(
        conforms(v, properties[key], schemas) if key in properties else extra is True or
        (extra is not False and conforms(v, extra, schemas)) for key, v in value.items())
  if kind == "array":
    return isinstance(value, list) and all(conforms(v, schema["items"], schemas) for v in value)
  python = {"string": str, "integer": int, "number": (int, float), "null": type(None)}[kind]
  return isinstance(value, python) and not isinstance(value, bool)


def test_openapi_describes_the_routes_and_a_real_answer_fits_it(client):
  api = client.get("/openapi.json").json()
  assert api["openapi"].startswith("3.1") and {"/search", "/healthz", "/metrics", "/metrics.json"} <= set(api["paths"])
  schemas = api["components"]["schemas"]
  search = api["paths"]["/search"]["post"]
  request = schemas[search["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]]
  # the request's schema carries this app's limits (LIMITS), from the pydantic model that validates bodies
  assert request["required"] == ["queries"] and request["additionalProperties"] is False
  queries, k = request["properties"]["queries"], request["properties"]["k"]
  assert (queries["minItems"], queries["maxItems"], queries["items"]["maxLength"]) == (1, 8, 100)
  assert (k["type"], k["minimum"], k["maximum"], k["default"]) == ("integer", 1, 100, http.DEFAULT_K)

  def schema_of(path, method, status):
    return api["paths"][path][method]["responses"][status]["content"]["application/json"]["schema"]

  body = {"queries": queries_for(3, 2), "k": 4}
  assert conforms(body, request, schemas)
  answer = client.post("/search", json=body).json()
  assert len(answer["results"]) == 2 and conforms(answer, schema_of("/search", "post", "200"), schemas)
  assert not conforms({"results": [[{"id": "doc1", "score": "0.5"}]]}, schema_of("/search", "post", "200"), schemas)
  refused = client.post("/search", json={"queries": ["a"], "topk": 3})
  assert refused.status_code == 422 and conforms(refused.json(), schema_of("/search", "post", "422"), schemas)
  assert not conforms({"queries": ["a"], "topk": 3}, request, schemas)
  assert conforms(client.get("/healthz").json(), schema_of("/healthz", "get", "200"), schemas)
  assert conforms(client.get("/metrics.json").json(), schema_of("/metrics.json", "get", "200"), schemas)


# Requests that are nearly right (the queries as text, with lone surrogates too; k any number or any JSON), any
# JSON (NaN included, as Python's json reads it) in or out of a request's shape, and raw bytes. Hypothesis
# leaves surrogates out of text, even from an alphabet that has them: they are pieces joined in.
_plain = st.text(st.characters(exclude_categories=["Zs", "Cc"]), min_size=1, max_size=30)  # rarely blank
_text = st.one_of(_plain, _plain, _plain, st.text(max_size=12), st.lists(
    st.text(max_size=12) | st.text(st.characters(categories=["Cs"]), min_size=1, max_size=2), max_size=4).map("".join))
_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | _text,
                     lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                     max_leaves=12)
_request = st.fixed_dictionaries(
    {"queries": st.lists(_text, min_size=1, max_size=9)},
    optional={"k": st.integers(-5, 200) | st.sampled_from([1.0, 2.5, float("nan"), float("inf")]) | st.floats()
                   | _json})
_shaped = st.fixed_dictionaries({}, optional={"queries": _json, "k": _json, "extra": _json})
_bodies = st.one_of(_request, _request, _request, _shaped, _json).map(json.dumps).map(str.encode) | st.binary(max_size=200)


def test_fuzzed_bodies_get_2xx_or_4xx_never_5xx_and_good_requests_are_unaffected(fake):
  """Hypothesis: every /search body answers 200 (with one result list per query) or 4xx with an error message,
  never 5xx, while a client sending good requests all along gets every answer right."""
  stop, good = threading.Event(), []

  def good_client(client):
    while not stop.is_set():
      q = f"good query {len(good)}"
      r = client.post("/search", json={"queries": [q], "k": 3})
      good.append(r.status_code == 200 and r.json()["results"] == results_of(fake, [q], 3))

  @hypothesis.settings(max_examples=300, deadline=None, derandomize=True, database=None,
                       suppress_health_check=list(hypothesis.HealthCheck))
  @hypothesis.given(body=_bodies)
  def fuzz(client, body):
    r = client.post("/search", content=body, headers={"content-type": "application/json"})
    assert r.status_code < 500, (body, r.status_code, r.text)
    answer = r.json()
    if r.status_code == 200:
      assert len(answer["results"]) == len(json.loads(body)["queries"])
    else:
      assert 400 <= r.status_code < 500 and answer["error"], (body, r.text)

  with TestClient(http.create_app(fake, LIMITS)) as client:
    thread = threading.Thread(target=good_client, args=(client,))
    thread.start()
    try:
      fuzz(client)
    finally:
      stop.set()
      thread.join()
  assert good and all(good), f"{good.count(False)} of {len(good)} good requests answered wrongly"


@contextlib.contextmanager
def real_server(fake, limits=http.Limits()):
  """(port, metrics()) of `serve`'s uvicorn configuration over `fake`, on a thread; shut down (and checked to be)
  on exit."""
  sock = socket.socket()
  sock.bind(("127.0.0.1", 0))  # a free port, held from here on: no race with other processes
  port = sock.getsockname()[1]
  server = uvicorn.Server(http.server_config(http.create_app(fake, limits), limits, log_level="warning"))
  thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
  thread.start()
  deadline = time.time() + 10
  while not server.started:
    assert time.time() < deadline and thread.is_alive(), "uvicorn did not start"
    time.sleep(0.01)
  try:
    yield port, lambda: httpx.get(f"http://127.0.0.1:{port}/metrics.json").json()
  finally:
    server.should_exit = True
    thread.join(timeout=10)
  assert not thread.is_alive()  # shut down cleanly


def test_load_on_a_real_server():
  fake = FakeRetriever(delay_s=0.001)  # ~1 ms per encoder call on top of the search itself

  clients, per_client = 16, 25
  def client_run(c: int) -> list[tuple[float, bool]]:
    rng = np.random.default_rng(c)
    out = []
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
      for i in range(per_client):
        queries, k = queries_for(c * 1000 + i, int(rng.integers(1, 4))), int(rng.integers(1, 11))
        t0 = time.perf_counter()
        r = client.post("/search", json={"queries": queries, "k": k})
        seconds = time.perf_counter() - t0
        out.append((seconds, r.status_code == 200 and r.json()["results"] == results_of(fake, queries, k),
                    len(queries)))
    return out

  with real_server(fake) as (port, get_metrics):
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
      runs = [row for rows in pool.map(client_run, range(clients)) for row in rows]
    wall = time.perf_counter() - t0
    metrics = get_metrics()

  n = clients * per_client
  latency_ms = 1000 * np.array([s for s, _, _ in runs])
  p50, p99 = np.percentile(latency_ms, [50, 99])
  print(f"\nload: {n} requests from {clients} concurrent clients in {wall:.2f} s: {n / wall:.0f} QPS, "
        f"p50 {p50:.1f} ms, p99 {p99:.1f} ms (client side); {metrics['batches']} encoder calls, "
        f"mean batch {metrics['mean_batch_size']:.1f} queries; server p50 {metrics['latency_ms']['p50']:.1f} ms, "
        f"p99 {metrics['latency_ms']['p99']:.1f} ms")
  assert len(runs) == n and all(ok for _, ok, _ in runs), "wrong or failed answers under load"
  assert metrics["requests"] == {"total": n, "by_status": {"200": n}}
  assert metrics["queries"] == sum(q for _, _, q in runs)
  assert metrics["batches"] == len(fake.calls) < n  # concurrent requests shared encoder calls
  assert metrics["latency_ms"]["window"] == n


def seconds_until_closed(sock: socket.socket, trickle: bytes = b"") -> tuple[float, bytes]:
  """(seconds until the server closes `sock`, what it sent before), sending `trickle` a byte every 50 ms."""
  t0, received = time.perf_counter(), b""
  while time.perf_counter() - t0 < 10:
    if select.select([sock], [], [], 0.05)[0]:
      try:
        data = sock.recv(65536)
      except ConnectionResetError:
        data = b""
      if not data:
        return time.perf_counter() - t0, received
      received += data
    if trickle:
      with contextlib.suppress(OSError):  # closed under us: the next recv says so
        sock.send(trickle[:1])
      trickle = trickle[1:]
  raise AssertionError(f"still open after 10 s (received {received!r})")


def test_slow_and_silent_connections_are_cut_off_and_good_requests_still_answered():
  """The review's slowloris: a connection that sends nothing, one that trickles its headers and one whose body
  stops arriving are each ended after request_timeout_s (the last with a 408), while a good request answers."""
  fake = FakeRetriever()
  limits = http.Limits(request_timeout_s=0.5, idle_timeout_s=0.5)
  with real_server(fake, limits) as (port, get_metrics):
    connect = lambda: socket.create_connection(("127.0.0.1", port), timeout=10)  # noqa: E731
    silent, trickling, stalled = connect(), connect(), connect()
    stalled.sendall(b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 100\r\n\r\n{\"queries\": [")
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
      closed = [pool.submit(seconds_until_closed, silent),
                pool.submit(seconds_until_closed, trickling, b"POST /search HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200),
                pool.submit(seconds_until_closed, stalled)]
      r = httpx.post(f"http://127.0.0.1:{port}/search", json={"queries": ["q"], "k": 3}, timeout=10)
      (t_silent, got_silent), (t_trickling, got_trickling), (t_stalled, got_stalled) = [f.result() for f in closed]
    assert r.status_code == 200 and r.json()["results"] == results_of(fake, ["q"], 3)
    assert 0.4 < t_silent < 5 and got_silent == b""
    assert 0.4 < t_trickling < 5 and got_trickling == b""  # it never finished its headers: no answer
    assert got_stalled.startswith(b"HTTP/1.1 408 ") and b"body: not received within 0.5 s" in got_stalled
    assert get_metrics()["requests"]["by_status"] == {"200": 1, "408": 1}


def test_excess_connections_and_queries_are_refused_with_503():
  """Beyond max_connections a request is answered 503; beyond max_pending queries waiting for the encoder a
  /search is a 503 with Retry-After, and those already admitted are answered once the encoder frees up."""
  fake = FakeRetriever()
  with real_server(fake, http.Limits(max_connections=2, max_pending=4)) as (port, get_metrics):
    url = f"http://127.0.0.1:{port}/search"
    held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
    time.sleep(0.2)  # accepted by the server
    assert httpx.post(url, json={"queries": ["q"]}, timeout=10).status_code == 503
    held.pop().close()
    held.pop().close()
    time.sleep(0.2)
    assert httpx.post(url, json={"queries": ["q"]}, timeout=10).status_code == 200

    fake.gate.clear()  # the encoder is busy: requests stay pending
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
      first = pool.submit(httpx.post, url, json={"queries": ["a", "b", "c"]}, timeout=10)
      deadline = time.time() + 10
      while len(fake.calls) < 2:  # the first request's search has started: 3 queries pending
        assert time.time() < deadline
        time.sleep(0.01)
      refused = httpx.post(url, json={"queries": ["d", "e"]}, timeout=10)  # 3 + 2 > 4
      fits = pool.submit(httpx.post, url, json={"queries": ["f"]}, timeout=10)  # 3 + 1 <= 4: waits its turn
      time.sleep(0.2)
      fake.gate.set()
      assert first.result().status_code == 200 and fits.result().status_code == 200
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert "3 queries already waiting for the encoder (the limit is 4)" in refused.json()["error"]
    assert first.result().json()["results"] == results_of(fake, ["a", "b", "c"], 10)


def test_serve_binds_localhost_by_default(monkeypatch):
  assert inspect.signature(http.serve).parameters["host"].default == "127.0.0.1"
  args = cli.build_parser().parse_args(["serve", "some/bundle"])
  assert (args.host, args.port) == ("127.0.0.1", 8000)

  # The CLI loads the bundle's retriever and hands it to serve with the limits given, defaults otherwise.
  seen = {}
  fake = FakeRetriever()

  class Retriever:
    @staticmethod
    def load(bundle, max_batch):
      seen.update(bundle=bundle, max_batch=max_batch)
      return fake

  fake.warmup = lambda: 0  # the CLI compiles the query encoder before it serves

  retriever_module = types.ModuleType("scalingnote_jax.serve.retriever")
  retriever_module.Retriever = Retriever
  monkeypatch.setitem(sys.modules, "scalingnote_jax.serve.retriever", retriever_module)
  monkeypatch.setattr(http, "serve", lambda retriever, **kw: seen.update(retriever=retriever, **kw))
  assert cli.main(["serve", "some/bundle", "--max-batch", "8", "--max-wait-ms", "5", "--request-timeout-s", "3",
                   "--max-connections", "9"]) == 0
  assert seen == {"bundle": "some/bundle", "max_batch": 8, "retriever": fake, "host": "127.0.0.1", "port": 8000,
                  "limits": http.Limits(max_batch=8, max_wait_ms=5.0, request_timeout_s=3.0, max_connections=9)}


def test_limits_refuse_nonsense():
  with pytest.raises(ValueError, match="max_batch"):
    http.Limits(max_batch=0)
  with pytest.raises(ValueError, match="max_wait_ms"):
    http.Limits(max_wait_ms=-1)
  with pytest.raises(ValueError, match="request_timeout_s=0"):
    http.Limits(request_timeout_s=0)
  with pytest.raises(ValueError, match="max_pending"):
    http.Limits(max_pending=0)
