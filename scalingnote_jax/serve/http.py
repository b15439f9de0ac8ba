"""The online retrieval service: a retriever behind HTTP (Starlette on uvicorn), with micro-batching.

  POST /search   {"queries": ["..."], "k": 10}        (k optional, default 10)
                 -> {"results": [[{"id": "doc7", "score": 0.93}, ...], ...]}   one list per query, in order
  GET  /healthz  -> {"status": "ok", "num_docs": N}
  GET  /metrics  -> /search request counts by status code, queries served, encoder calls and their mean batch
                    size, latency percentiles (ms) over the last LATENCY_WINDOW /search requests

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

Bad input is answered 4xx with {"error": "<field>: <what is wrong and the limit>"}: 400 for a body that is
not a JSON object, 413 for too many queries, a query too long or a body too large, 422 for a wrong field.
Text that is not Unicode (a lone surrogate escape) is a 422 too. When a batched `search` fails, each of its
requests is searched again alone, so only the request that fails is answered 500; the service keeps going.

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
import json
import logging
import time

import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from scalingnote_jax.index.hits import Hits

log = logging.getLogger(__name__)
DEFAULT_K = 10
LATENCY_WINDOW = 10_000  # /metrics percentiles are over this many most recent search requests


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
  """Counters for /metrics; only touched from the event loop, so no lock."""

  def __init__(self):
    self.start = time.time()
    self.requests = 0
    self.by_status = collections.Counter()
    self.queries = 0  # queries answered with results (status 200)
    self.batches = 0  # retriever.search calls
    self.batched_queries = 0  # queries in those calls
    self.latencies_ms = collections.deque(maxlen=LATENCY_WINDOW)

  def observe(self, status: int, num_queries: int, seconds: float) -> None:
    self.requests += 1
    self.by_status[str(status)] += 1
    if status == 200:
      self.queries += num_queries
    self.latencies_ms.append(1000 * seconds)

  def report(self) -> dict:
    latency = {"window": len(self.latencies_ms)}
    if self.latencies_ms:
      p50, p90, p99 = np.percentile(np.asarray(self.latencies_ms), [50, 90, 99])
      latency.update(p50=float(p50), p90=float(p90), p99=float(p99))
    return {
        "uptime_s": time.time() - self.start,
        "requests": {"total": self.requests, "by_status": dict(sorted(self.by_status.items()))},
        "queries": self.queries,
        "batches": self.batches,
        "mean_batch_size": self.batched_queries / self.batches if self.batches else 0.0,
        "latency_ms": latency,
    }


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
    self.metrics.batches += 1
    self.metrics.batched_queries += len(queries)
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


def parse_search(body: bytes, limits: Limits, num_docs: int) -> tuple[list[str], int]:
  """The queries and k of a /search body, or ErrorReply (4xx) naming the field and the limit."""
  try:
    request = json.loads(body)
  except (ValueError, RecursionError) as e:  # ValueError covers bad JSON and bad UTF-8
    raise ErrorReply(400, f"body: not valid JSON ({e})") from None
  if not isinstance(request, dict):
    raise ErrorReply(400, f"body: expected a JSON object {{\"queries\": [...], \"k\": {DEFAULT_K}}}, "
                          f"got {type(request).__name__}")
  unknown = sorted(set(request) - {"queries", "k"})
  if unknown:
    raise ErrorReply(422, f"body: unknown field(s) {unknown}; expected 'queries' and optionally 'k'")

  if "queries" not in request:
    raise ErrorReply(422, f"queries: missing (a list of 1 to {limits.max_queries} strings)")
  queries = request["queries"]
  if not isinstance(queries, list):
    raise ErrorReply(422, f"queries: expected a list of strings, got {type(queries).__name__}")
  if not queries:
    raise ErrorReply(422, f"queries: empty; send 1 to {limits.max_queries} queries")
  if len(queries) > limits.max_queries:
    raise ErrorReply(413, f"queries: {len(queries)} queries exceed the limit of {limits.max_queries} per request")
  for i, q in enumerate(queries):
    if not isinstance(q, str):
      raise ErrorReply(422, f"queries[{i}]: expected a string, got {type(q).__name__}")
    if not q.strip():
      raise ErrorReply(422, f"queries[{i}]: empty query")
    if len(q) > limits.max_query_chars:
      raise ErrorReply(413, f"queries[{i}]: {len(q)} characters exceed the limit of {limits.max_query_chars}")
    try:
      q.encode("utf-8")
    except UnicodeEncodeError as e:  # JSON's \ud800 escapes decode to lone surrogates, which are not text
      raise ErrorReply(422, f"queries[{i}]: not Unicode text (a lone surrogate at character {e.start})") from None

  k = request.get("k", DEFAULT_K)
  # bool is an int in Python, and 10.0 is a float in JSON: neither is a valid k.
  if isinstance(k, bool) or not isinstance(k, int) or k < 1:
    raise ErrorReply(422, f"k: expected a positive integer, got {json.dumps(k)}")
  if k > limits.max_k:
    raise ErrorReply(422, f"k: {k} exceeds the limit of {limits.max_k}")
  if k > num_docs:
    raise ErrorReply(422, f"k: {k} exceeds the {num_docs} documents in the index")
  return queries, k


def create_app(retriever, limits: Limits = Limits()) -> Starlette:
  """The service over `retriever`; its batcher starts and stops with the app's lifespan."""
  metrics = Metrics()
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

  async def metrics_endpoint(request: Request) -> JSONResponse:
    return JSONResponse(metrics.report())

  async def http_error(request: Request, e: HTTPException) -> JSONResponse:
    # Unknown paths (404) and wrong methods (405) answer JSON too, like everything else.
    return JSONResponse({"error": f"{request.method} {request.url.path}: {e.detail}"}, status_code=e.status_code,
                        headers=e.headers)

  return Starlette(routes=[Route("/search", search, methods=["POST"]),
                           Route("/healthz", healthz, methods=["GET"]),
                           Route("/metrics", metrics_endpoint, methods=["GET"])],
                   exception_handlers={HTTPException: http_error}, lifespan=lifespan)


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
