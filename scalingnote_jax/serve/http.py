"""The online retrieval service: a retriever behind HTTP (Starlette on uvicorn), with micro-batching.

  POST /search        {"queries": ["..."], "k": 10}        (k optional, default 10)
                      -> {"results": [[{"id": "doc7", "score": 0.93}, ...], ...]}   one list per query, in order
  GET  /healthz       -> {"status": "ok", "num_docs": N}
  GET  /metrics       -> Prometheus text format (prometheus_client; OpenMetrics when the scraper asks for it):
                         /search requests by status code and their latency, queries served, encoder calls and
                         their sizes, the process's CPU and memory
  GET  /metrics.json  -> the same counts as one JSON object, for a look with curl: with the mean batch size and
                         latency percentiles (ms) over the last LATENCY_WINDOW /search requests
  GET  /openapi.json  -> an OpenAPI 3.1 description of these routes, generated from the pydantic models below

  app = create_app(retriever, Limits(max_batch=32))   # any ASGI server; or serve(retriever) runs uvicorn

The retriever is any object with `search(queries, k) -> Hits` (ids [Q][k], float32 scores [Q, k]) and `num_docs`
(serve/retriever.py's Retriever). Its `search` is synchronous and not thread-safe, so it runs on one worker
thread, off the event loop.

Micro-batching: handlers put their queries on one asyncio queue; one background task takes the first waiting
request, then keeps taking requests until the batch holds `max_batch` queries or `max_wait_ms` have passed
since it took the first (requests already queued join regardless), and runs one `search` for all of them with
the largest k among them (each request gets its own k back by truncation). A request that would overflow the
batch waits for the next one; a request with more than `max_batch` queries is split into chunks of
`max_batch` (so no encoder call is ever larger) and answered once all its chunks are done. While a batch runs
new requests pile up in the queue, so under load batches fill by themselves; a lone request waits at most
`max_wait_ms` longer than alone.

A /search body is read by Python's json and validated by a pydantic model built from the Limits (strict types,
no unknown fields; `search_request_model`). Bad input is answered 4xx with {"error": "<field>: <what is wrong and
the limit>"}: 400 for a body that is not a JSON object, 413 for too many queries, a query too long or a body too
large, 422 for a wrong field. Text that is not Unicode (a lone surrogate escape) is a 422 too. When a batched
`search` fails, each of its requests is searched again alone, so only the request that fails is answered 500;
the service keeps going.

Slow and excess clients (`serve`, Limits): a connection must deliver each request's line and headers within
`request_timeout_s` of opening (or of its previous response) or it is closed; a body not received within
`request_timeout_s` is a 408; an idle keep-alive connection is closed after `idle_timeout_s`. Beyond
`max_connections` open connections a request is answered 503, and beyond `max_pending` queries waiting for
the encoder a /search is answered 503 with Retry-After (overload shows as refusals, not as unbounded latency).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import importlib.metadata
import json
import logging
import time
from typing import Annotated, Literal

import numpy as np
import prometheus_client
import pydantic
import pydantic.json_schema
import pydantic_core
from prometheus_client.exposition import choose_encoder
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from scalingnote_jax.index.hits import Hits

log = logging.getLogger(__name__)
DEFAULT_K = 10
LATENCY_WINDOW = 10_000  # /metrics.json percentiles are over this many most recent search requests
# /search latency histogram buckets (s): a search takes milliseconds, so finer than prometheus_client's defaults
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclasses.dataclass(frozen=True)
class Limits:
  """Per-request limits and the micro-batching knobs."""
  max_queries: int = 64  # queries in one request
  max_query_chars: int = 2048  # characters in one query (the tokenizer truncates far below anyway)
  max_k: int = 1000  # results per query
  max_batch: int = 64  # queries in one `retriever.search` call (one encoder batch)
  max_wait_ms: float = 2.0  # how long a batch waits for more requests after its first
  max_pending: int = 4096  # queries waiting for (or in) an encoder call; more: 503 with Retry-After
  max_connections: int = 256  # open connections (serve); a request beyond: 503
  request_timeout_s: float = 10.0  # to send a request's head, and again its body (serve; body: 408)
  idle_timeout_s: float = 5.0  # a keep-alive connection with no next request is closed (serve)

  def __post_init__(self):
    for name in ("max_queries", "max_query_chars", "max_k", "max_batch", "max_pending", "max_connections"):
      if getattr(self, name) < 1:
        raise ValueError(f"Limits.{name}={getattr(self, name)}: must be at least 1")
    if self.max_wait_ms < 0:
      raise ValueError(f"Limits.max_wait_ms={self.max_wait_ms}: must be at least 0")
    for name in ("request_timeout_s", "idle_timeout_s"):
      if not getattr(self, name) > 0:
        raise ValueError(f"Limits.{name}={getattr(self, name)}: must be more than 0")

  @property
  def max_body_bytes(self) -> int:
    # Room for max_queries queries of max_query_chars characters each even if every character is sent as a
    # 6-byte \uXXXX escape; anything larger is refused before it is parsed.
    return self.max_queries * (6 * self.max_query_chars + 8) + 1024


class ErrorReply(Exception):
  """A request the service cannot answer with results: answered with `status` and {"error": message}."""

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status = status
    self.headers = {"Retry-After": "1"} if status == 503 else None


@dataclasses.dataclass
class _Job:
  """At most max_batch queries of one request, waiting for their results."""
  queries: list[str]
  k: int
  future: asyncio.Future


class Metrics:
  """The service's counters, in a Prometheus registry of its own (two apps in one process do not collide), and
  the latencies of the last LATENCY_WINDOW /search requests for /metrics.json's percentiles. Only touched from
  the event loop."""

  def __init__(self, limits: Limits):
    self.start = time.time()
    self.registry = prometheus_client.CollectorRegistry()
    prometheus_client.ProcessCollector(registry=self.registry)  # process_* (CPU, memory), as the default registry has
    self.requests = prometheus_client.Counter(
        "scalingnote_search_requests_total", "/search requests answered, by HTTP status code", ["code"],
        registry=self.registry)
    self.latency = prometheus_client.Histogram(
        "scalingnote_search_request_duration_seconds", "time to answer a /search request, body read included",
        buckets=LATENCY_BUCKETS_S, registry=self.registry)
    self.queries = prometheus_client.Counter(
        "scalingnote_search_queries_total", "queries answered with results (status 200)", registry=self.registry)
    sizes = sorted({2 ** i for i in range(limits.max_batch.bit_length())} | {limits.max_batch})
    self.batch_size = prometheus_client.Histogram(
        "scalingnote_encoder_batch_size", "queries per encoder call (retriever.search); _count: the calls",
        buckets=sizes, registry=self.registry)
    self.latencies_ms = collections.deque(maxlen=LATENCY_WINDOW)

  def observe(self, status: int, num_queries: int, seconds: float) -> None:
    self.requests.labels(code=str(status)).inc()
    self.latency.observe(seconds)
    if status == 200:
      self.queries.inc(num_queries)
    self.latencies_ms.append(1000 * seconds)

  def observe_batch(self, num_queries: int) -> None:
    self.batch_size.observe(num_queries)

  def report(self) -> dict:
    """/metrics.json: read back from the Prometheus metrics, so both formats always agree."""
    by_status = {s.labels["code"]: int(s.value) for s in _samples(self.requests, "_total")}
    batches = int(_samples(self.batch_size, "_count")[0].value)
    batched_queries = _samples(self.batch_size, "_sum")[0].value
    latency = {"window": len(self.latencies_ms)}
    if self.latencies_ms:
      p50, p90, p99 = np.percentile(np.asarray(self.latencies_ms), [50, 90, 99])
      latency.update(p50=float(p50), p90=float(p90), p99=float(p99))
    return MetricsReport(
        uptime_s=time.time() - self.start,
        requests={"total": sum(by_status.values()), "by_status": dict(sorted(by_status.items()))},
        queries=int(_samples(self.queries, "_total")[0].value), batches=batches,
        mean_batch_size=batched_queries / batches if batches else 0.0, latency_ms=latency).model_dump()


def _samples(metric, suffix: str) -> list:
  """The samples of `metric` whose name ends with `suffix` (prometheus_client has no public getter of a value)."""
  return [s for family in metric.collect() for s in family.samples if s.name.endswith(suffix)]


class Batcher:
  """One queue, one task: merges concurrent requests into `retriever.search` calls on one worker thread."""

  def __init__(self, retriever, limits: Limits, metrics: Metrics):
    self.retriever = retriever
    self.limits = limits
    self.metrics = metrics
    self.queue: asyncio.Queue[_Job] = asyncio.Queue()
    self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="retriever-search")
    self.task: asyncio.Task | None = None
    self.batch: list[_Job] = []  # the batch being searched (or last searched)
    self.carried: _Job | None = None  # the job that did not fit in the last batch: first in the next
    self.pending = 0  # queries of requests not yet answered: admission control

  def start(self) -> None:
    self.task = asyncio.get_running_loop().create_task(self.run())

  async def stop(self) -> None:
    self.task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
      await self.task
    # Requests still waiting (uvicorn normally lets them finish before shutdown) fail rather than hang.
    waiting = self.batch + ([self.carried] if self.carried else [])
    while not self.queue.empty():
      waiting.append(self.queue.get_nowait())
    for job in waiting:
      if not job.future.done():
        job.future.set_exception(RuntimeError("the service is shutting down"))
    # A search still running on the worker thread finishes there; the event loop does not wait for it.
    self.executor.shutdown(wait=False, cancel_futures=True)

  async def search(self, queries: list[str], k: int) -> Hits:
    """Results of one request: ids and scores (lists of floats) per query, k each."""
    if self.pending + len(queries) > self.limits.max_pending:
      raise ErrorReply(503, f"service: {self.pending} queries already waiting for the encoder (the limit is "
                            f"{self.limits.max_pending}); retry shortly")
    loop = asyncio.get_running_loop()
    step = self.limits.max_batch
    jobs = [_Job(queries[i:i + step], k, loop.create_future()) for i in range(0, len(queries), step)]
    self.pending += len(queries)
    try:
      for job in jobs:
        self.queue.put_nowait(job)
      ids, scores = [], []
      for job in jobs:
        hits = await job.future
        ids += hits.ids
        scores += hits.scores
      return Hits(ids, scores)
    finally:
      self.pending -= len(queries)

  async def run(self) -> None:
    loop = asyncio.get_running_loop()
    while True:
      batch = [self.carried or await self.queue.get()]
      self.carried = None
      size = len(batch[0].queries)
      deadline = loop.time() + self.limits.max_wait_ms / 1000
      while size < self.limits.max_batch:
        if self.queue.empty():
          timeout = deadline - loop.time()
          if timeout <= 0:
            break
          try:
            job = await asyncio.wait_for(self.queue.get(), timeout)
          except TimeoutError:
            break
        else:  # requests already waiting join whatever the deadline says (they piled up during a search)
          job = self.queue.get_nowait()
        if size + len(job.queries) > self.limits.max_batch:
          self.carried = job
          break
        batch.append(job)
        size += len(job.queries)
      self.batch = batch
      await self.run_batch(batch)

  async def run_batch(self, batch: list[_Job]) -> None:
    queries = [q for job in batch for q in job.queries]
    k = max(job.k for job in batch)
    self.metrics.observe_batch(len(queries))
    try:
      hits = await asyncio.get_running_loop().run_in_executor(self.executor, self.retriever.search, queries, k)
      ids, scores = hits.ids, np.asarray(hits.scores, dtype=np.float32)
      if len(ids) != len(queries) or len(scores) != len(queries):
        raise RuntimeError(f"retriever.search returned {len(ids)} id lists and {len(scores)} score rows "
                           f"for {len(queries)} queries")
      results, start = [], 0
      for job in batch:  # each request truncates to its own k
        end = start + len(job.queries)
        results.append(Hits([list(row[:job.k]) for row in ids[start:end]],
                            [row[:job.k].tolist() for row in scores[start:end]]))
        start = end
    except Exception as e:  # noqa: BLE001 -- any failure is answered 500 to this batch's requests only
      if len(batch) > 1:  # find the request it came from: each alone, so the others still get answers
        for job in batch:
          await self.run_batch([job])
        return
      log.exception("retriever.search failed on a request of %d queries", len(queries))
      results = [e]
    for job, result in zip(batch, results):
      if job.future.done():  # its request was cancelled (the client left)
        continue
      if isinstance(result, Exception):
        job.future.set_exception(result)
      else:
        job.future.set_result(result)


# The API as pydantic models: the request's validates /search bodies, and all of them generate /openapi.json.

def _query_text(max_chars: int):
  """A query: a string (pydantic's strict check), not blank, at most max_chars characters, Unicode text."""
  def check(q):
    # Before pydantic's own str check, which calls a lone surrogate "not a string" before counting characters:
    # so the checks keep the service's order (blank, too long, not Unicode) and messages.
    if not isinstance(q, str):
      return q  # refused by the strict str check next
    if not q.strip():
      raise pydantic_core.PydanticCustomError("query_blank", "empty query")
    if len(q) > max_chars:
      raise pydantic_core.PydanticCustomError("query_too_long", "{length} characters exceed the limit of {limit}",
                                              {"length": len(q), "limit": max_chars})
    try:
      q.encode("utf-8")
    except UnicodeEncodeError as e:  # JSON's \ud800 escapes decode to lone surrogates, which are not text
      raise pydantic_core.PydanticCustomError("query_not_unicode", "not Unicode text (a lone surrogate at "
                                              "character {start})", {"start": e.start}) from None
    return q
  # (max_length is checked above first; here it is for the schema)
  return Annotated[str, pydantic.Field(max_length=max_chars), pydantic.BeforeValidator(check)]


@functools.cache
def search_request_model(limits: Limits) -> type[pydantic.BaseModel]:
  """The /search body, with `limits` in its constraints (and so in /openapi.json)."""
  return pydantic.create_model(
      "SearchRequest", __config__=pydantic.ConfigDict(strict=True, extra="forbid"),
      queries=(list[_query_text(limits.max_query_chars)], pydantic.Field(
          min_length=1, max_length=limits.max_queries,
          description=f"1 to {limits.max_queries} queries, each not blank and at most {limits.max_query_chars} "
                      "characters")),
      k=(int, pydantic.Field(DEFAULT_K, ge=1, le=limits.max_k, description=(
          f"results per query, at most {limits.max_k} and the number of documents in the index (/healthz)"))))


class Hit(pydantic.BaseModel):
  id: str = pydantic.Field(description="the document's id")
  score: float = pydantic.Field(description="its similarity to the query (inner product)")


class SearchResponse(pydantic.BaseModel):
  results: list[list[Hit]] = pydantic.Field(description="one list per query, in order: its k best documents, best "
                                                        "first (fewer where the index could not fill them)")


class ErrorResponse(pydantic.BaseModel):
  error: str = pydantic.Field(description="<field>: <what is wrong and the limit>")


class Health(pydantic.BaseModel):
  status: Literal["ok"]
  num_docs: int = pydantic.Field(description="documents in the index")


class RequestCounts(pydantic.BaseModel):
  total: int
  by_status: dict[str, int] = pydantic.Field(description="/search requests by HTTP status code")


class Latency(pydantic.BaseModel):
  window: int = pydantic.Field(description=f"the last /search requests measured (at most {LATENCY_WINDOW})")
  p50: float | None = None  # none before the first request
  p90: float | None = None
  p99: float | None = None


class MetricsReport(pydantic.BaseModel):
  uptime_s: float
  requests: RequestCounts
  queries: int = pydantic.Field(description="queries answered with results (status 200)")
  batches: int = pydantic.Field(description="encoder calls (retriever.search)")
  mean_batch_size: float = pydantic.Field(description="queries per encoder call")
  latency_ms: Latency


def parse_search(body: bytes, limits: Limits, num_docs: int) -> tuple[list[str], int]:
  """The queries and k of a /search body, or ErrorReply (4xx) naming the field and the limit."""
  try:
    # Python's json rather than pydantic's parser: it reads \ud800 escapes (a 422 naming the query, not a 400)
    request = json.loads(body)
  except (ValueError, RecursionError) as e:  # ValueError covers bad JSON and bad UTF-8
    raise ErrorReply(400, f"body: not valid JSON ({e})") from None
  try:
    parsed = search_request_model(limits).model_validate(request)
  except pydantic.ValidationError as e:
    raise _error_reply(e.errors(include_url=False), limits) from None
  if parsed.k > num_docs:  # the index's size is not the request's to know: checked after the model's rules
    raise ErrorReply(422, f"k: {parsed.k} exceeds the {num_docs} documents in the index")
  return parsed.queries, parsed.k


def _error_reply(errors: list[dict], limits: Limits) -> ErrorReply:
  """The 4xx answer to a body search_request_model refused: its first problem, worded for a person."""
  unknown = sorted(e["loc"][0] for e in errors if e["type"] == "extra_forbidden")
  if unknown:  # all of them, before anything else
    return ErrorReply(422, f"body: unknown field(s) {unknown}; expected 'queries' and optionally 'k'")
  # pydantic reports in the model's order: queries (a too-long list before its items, items in order), then k
  first = errors[0]
  loc, kind, value = first["loc"], first["type"], first["input"]
  if loc == ():
    return ErrorReply(400, f"body: expected a JSON object {{\"queries\": [...], \"k\": {DEFAULT_K}}}, "
                           f"got {type(value).__name__}")
  if loc == ("queries",):
    if kind == "missing":
      return ErrorReply(422, f"queries: missing (a list of 1 to {limits.max_queries} strings)")
    if kind == "list_type":
      return ErrorReply(422, f"queries: expected a list of strings, got {type(value).__name__}")
    if kind == "too_short":
      return ErrorReply(422, f"queries: empty; send 1 to {limits.max_queries} queries")
    if kind == "too_long":
      return ErrorReply(413, f"queries: {len(value)} queries exceed the limit of {limits.max_queries} per request")
  if loc[0] == "queries" and len(loc) == 2:
    if kind == "string_type":
      return ErrorReply(422, f"queries[{loc[1]}]: expected a string, got {type(value).__name__}")
    return ErrorReply(413 if kind == "query_too_long" else 422, f"queries[{loc[1]}]: {first['msg']}")
  if loc == ("k",):
    if kind == "less_than_equal":
      return ErrorReply(422, f"k: {value} exceeds the limit of {limits.max_k}")
    # int_type covers bool (an int in Python) and 10.0 (a float in JSON): neither is a valid k
    return ErrorReply(422, f"k: expected a positive integer, got {json.dumps(value)}")
  return ErrorReply(422, f"{'.'.join(map(str, loc))}: {first['msg']}")  # a rule with no wording of its own


def create_app(retriever, limits: Limits = Limits()) -> Starlette:
  """The service over `retriever`; its batcher starts and stops with the app's lifespan."""
  metrics = Metrics(limits)
  description = openapi(limits)
  state = {"batcher": None}

  @contextlib.asynccontextmanager
  async def lifespan(app):
    batcher = Batcher(retriever, limits, metrics)
    batcher.start()
    state["batcher"] = batcher
    try:
      yield
    finally:
      state["batcher"] = None
      await batcher.stop()

  async def search(request: Request) -> JSONResponse:
    t0 = time.perf_counter()
    num_queries = 0
    try:
      body = await read_body(request, limits.max_body_bytes, limits.request_timeout_s)
      queries, k = parse_search(body, limits, retriever.num_docs)
      num_queries = len(queries)
      batcher = state["batcher"]
      if batcher is None:
        raise ErrorReply(503, "service: not started (run the app with its lifespan)")
      try:
        hits = await batcher.search(queries, k)
      except ErrorReply:  # refused at admission (503)
        raise
      except Exception as e:  # noqa: BLE001 -- reported to this request; the batcher keeps running
        raise ErrorReply(500, f"search failed: {type(e).__name__}: {e}") from None
      # a result the index could not fill (id None, score -inf) is left out: no "None" document
      response = JSONResponse({"results": [[{"id": str(i), "score": s} for i, s in zip(row_ids, row_scores)
                                            if i is not None] for row_ids, row_scores in zip(hits.ids, hits.scores)]})
    except ErrorReply as e:
      response = JSONResponse({"error": str(e)}, status_code=e.status, headers=e.headers)
    except Exception as e:  # noqa: BLE001 -- e.g. a NaN score JSON refuses to encode: still a JSON answer
      log.exception("/search failed")
      response = JSONResponse({"error": f"internal error: {type(e).__name__}: {e}"}, status_code=500)
    metrics.observe(response.status_code, num_queries, time.perf_counter() - t0)
    return response

  async def healthz(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok", "num_docs": int(retriever.num_docs)})

  async def metrics_endpoint(request: Request) -> Response:
    # The format the scraper asks for (Accept): Prometheus text by default, OpenMetrics if it prefers that
    encoder, media_type = choose_encoder(request.headers.get("accept", ""))
    return Response(encoder(metrics.registry), media_type=media_type)

  async def metrics_json(request: Request) -> JSONResponse:
    return JSONResponse(metrics.report())

  async def openapi_endpoint(request: Request) -> JSONResponse:
    return JSONResponse(description)

  async def http_error(request: Request, e: HTTPException) -> JSONResponse:
    # Unknown paths (404) and wrong methods (405) answer JSON too, like everything else.
    return JSONResponse({"error": f"{request.method} {request.url.path}: {e.detail}"}, status_code=e.status_code,
                        headers=e.headers)

  return Starlette(routes=[Route("/search", search, methods=["POST"]),
                           Route("/healthz", healthz, methods=["GET"]),
                           Route("/metrics", metrics_endpoint, methods=["GET"]),
                           Route("/metrics.json", metrics_json, methods=["GET"]),
                           Route("/openapi.json", openapi_endpoint, methods=["GET"])],
                   exception_handlers={HTTPException: http_error}, lifespan=lifespan)


def openapi(limits: Limits) -> dict:
  """The OpenAPI 3.1 description of the service, its schemas generated from the pydantic models (the request's
  with `limits`)."""
  request_model = search_request_model(limits)
  responses = (SearchResponse, ErrorResponse, Health, MetricsReport)
  refs, schemas = pydantic.json_schema.models_json_schema(
      [(request_model, "validation")] + [(model, "serialization") for model in responses],
      ref_template="#/components/schemas/{model}")

  def json_body(model, description: str) -> dict:
    mode = "validation" if model is request_model else "serialization"
    return {"description": description, "content": {"application/json": {"schema": refs[(model, mode)]}}}

  text = {"schema": {"type": "string"}}
  return {
      "openapi": "3.1.0",
      "info": {"title": "scalingnote-jax retrieval service", "version": _package_version(),
               "description": "Dense retrieval over a serving bundle (`scalingnote serve`), with micro-batching."},
      "paths": {
          "/search": {"post": {
              "summary": "the k best documents of the index for each query",
              "requestBody": {"required": True, **json_body(request_model, "queries and k")},
              "responses": {
                  "200": json_body(SearchResponse, "one result list per query, in the request's order"),
                  "400": json_body(ErrorResponse, "the body is not JSON, or not a JSON object"),
                  "408": json_body(ErrorResponse, "the body did not arrive within the request timeout"),
                  "413": json_body(ErrorResponse, "too many queries, a query too long, or a body too large"),
                  "422": json_body(ErrorResponse, "a field is wrong (named in the message, with the limit)"),
                  "500": json_body(ErrorResponse, "the search failed for this request; the service goes on"),
                  "503": json_body(ErrorResponse, "too many queries waiting for the encoder: retry after "
                                                  "Retry-After seconds (beyond the connection limit uvicorn "
                                                  "answers 503 in plain text)")}}},
          "/healthz": {"get": {"summary": "the service is up", "responses": {
              "200": json_body(Health, "up, with the size of its index")}}},
          "/metrics": {"get": {"summary": "Prometheus metrics (scalingnote_*, process_*)", "responses": {
              "200": {"description": "Prometheus text format, or OpenMetrics when the Accept header prefers it",
                      "content": {"text/plain; version=0.0.4": text, "application/openmetrics-text": text}}}}},
          "/metrics.json": {"get": {"summary": "the metrics as one JSON object, with latency percentiles",
                                    "responses": {"200": json_body(MetricsReport, "the service's counts so far")}}},
      },
      "components": {"schemas": schemas["$defs"]},
  }


def _package_version() -> str:
  try:
    return importlib.metadata.version("scalingnote-jax")
  except importlib.metadata.PackageNotFoundError:  # run from a source tree that is not installed
    return "unknown"


async def read_body(request: Request, max_bytes: int, timeout_s: float) -> bytes:
  """The request body, refused with 413 as soon as it passes max_bytes (never buffers more), and with 408
  when it has not all arrived within timeout_s."""
  body = bytearray()
  try:
    async with asyncio.timeout(timeout_s):
      async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
          raise ErrorReply(413, f"body: more than {max_bytes} bytes (the limit)")
  except TimeoutError:
    raise ErrorReply(408, f"body: not received within {timeout_s:g} s ({len(body)} bytes arrived)") from None
  return bytes(body)


def serve(retriever, host: str = "127.0.0.1", port: int = 8000, limits: Limits = Limits(),
          log_level: str = "info") -> None:
  """Runs the service with uvicorn until interrupted: one process (the retriever lives in it).

  The default host answers this machine only; pass host="0.0.0.0" deliberately to expose it.
  """
  import uvicorn  # only the server needs it; create_app works under any ASGI server

  uvicorn.Server(server_config(create_app(retriever, limits), limits, host=host, port=port,
                               log_level=log_level)).run()


def server_config(app, limits: Limits, **kw):
  """uvicorn's Config for `app` with `limits`' connection cap and timeouts (kw: host, port, log_level...)."""
  import uvicorn  # as in `serve`: only the server needs it
  from uvicorn.protocols.http.h11_impl import H11Protocol

  class Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request's head, which uvicorn itself does not have: a
    connection that has not sent a whole request line and headers within request_timeout_s of opening (or of
    its previous response) is closed, so trickling or silent clients cannot hold connections for ever."""

    def connection_made(self, transport):
      super().connection_made(transport)
      self.head_deadline = None
      self.arm_head_deadline()

    def on_response_complete(self):
      super().on_response_complete()
      self.arm_head_deadline()

    def connection_lost(self, exc):
      if self.head_deadline is not None:
        self.head_deadline.cancel()
      super().connection_lost(exc)

    def arm_head_deadline(self):
      if self.head_deadline is not None:
        self.head_deadline.cancel()
      waiting_after = self.cycle  # a new request replaces the cycle once its head has arrived
      self.head_deadline = self.loop.call_later(
          limits.request_timeout_s, lambda: self.cycle is waiting_after and self.transport.close())

  # uvicorn answers 503 once its connection count (this one included) reaches limit_concurrency
  return uvicorn.Config(app, http=Protocol, limit_concurrency=limits.max_connections + 1,
                        timeout_keep_alive=limits.idle_timeout_s, **kw)
