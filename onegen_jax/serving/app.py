"""The HTTP API of a OneGen server (FastAPI on uvicorn; see launch/serve.py).

  POST   /v1/generate                 messages or prompt -> text, retrievals, EL mentions
                                      ("answer_prefix": the answer's start, forced)
  POST   /v1/sessions/{id}/turns      a user turn continued over the session's kept cache
  DELETE /v1/sessions/{id}            frees a session's cache
  GET    /health                      200 {"status": "ok"}, 503 while shutting down
  GET    /metrics                     Prometheus text: queue, occupancy, tokens/s, retrievals/s

A result is `inference.requests.output_record` (what launch.infer writes per line: text,
finished, stop_reason, retrievals, and for EL plain_text and mentions) plus `id`, `usage` and,
for a session, `session_id`. A selfrag model's request with "selfrag": {"mode", "threshold",
"ndocs", "w_rel", "w_sup", "w_use", "use_seq_score"} runs Self-RAG's procedure (its own engine,
batched with the other Self-RAG requests queued at the same time) and gets what launch.infer
--selfrag_mode writes (answer, retrieved, evidence with scores). With "stream": true the answer is server-sent events: `token`
({"text": the new text, "tokens": their ids}; the texts add up to the result's text),
`retrieval` ({"position", "ids", "scores"}), then `done` (the result) or `error`.

Errors: {"error": one line} with 400 (malformed JSON, a prompt longer than the cache), 404
(unknown session), 409 (a session's turn already running), 413 (body over the limit), 422 (a
missing, unknown, wrong-typed or out-of-range field), 429 (too many sessions), 503 (shutting
down); an internal error is 500 {"error": "internal error", "id"} with the traceback logged
under that id, and fails that request only. A client that goes away cancels its request (its
slot is freed at the next engine step).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator

import fastapi
from fastapi import responses
from starlette.exceptions import HTTPException

from onegen_jax.inference.requests import output_record, output_text
from onegen_jax.inference.run_dir import LoadedRun
from onegen_jax.inference.selfrag import SelfRagResult
from onegen_jax.inference.types import RequestOutput
from onegen_jax.serving import schema
from onegen_jax.serving.metrics import prometheus_text
from onegen_jax.serving.worker import (ClientError, EngineWorker, InternalError, Job, Update,
                                       new_error_id)

log = logging.getLogger("onegen_jax.serving")
_DISCONNECT_POLL_S = 0.25  # how often a waiting handler checks that its client is still there


def create_app(run: LoadedRun, worker: EngineWorker, limits: schema.Limits) -> fastapi.FastAPI:
  """The API over a started-or-not worker (the app's lifespan starts and stops it)."""

  @contextlib.asynccontextmanager
  async def lifespan(_):
    worker.start()
    yield
    await asyncio.to_thread(worker.stop)

  app = fastapi.FastAPI(title="onegen_jax", lifespan=lifespan)
  _add_error_handlers(app)
  answers = _Answers(run, worker)

  @app.post("/v1/generate")
  async def generate(request: fastapi.Request):
    body = schema.parse(await _body(request, limits.max_body_bytes), schema.GenerateBody)
    prepared = schema.engine_request(body, run, limits)
    job = Job(prepared, asyncio.get_running_loop(),
              session=uuid.uuid4().hex if body.keep_session else None,
              selfrag=schema.selfrag_config(body, run, limits, prepared))
    return await answers.answer(request, job, body.stream)

  @app.post("/v1/sessions/{session_id}/turns")
  async def turn(session_id: str, request: fastapi.Request):
    body = schema.parse(await _body(request, limits.max_body_bytes), schema.TurnBody)
    if not worker.has_session(session_id):  # before tokenising: the common mistake first
      raise ClientError(404, f"unknown session {session_id!r}")
    engine_request = schema.engine_request(body, run, limits, turn=True)
    job = Job(engine_request, asyncio.get_running_loop(), session=session_id,
              turn=engine_request.prompt)
    return await answers.answer(request, job, body.stream)

  @app.delete("/v1/sessions/{session_id}")
  async def close(session_id: str):
    if worker.close_session(session_id):
      return {"closed": session_id}
    if worker.has_session(session_id):
      raise ClientError(409, f"session {session_id!r} has a turn running")
    raise ClientError(404, f"unknown session {session_id!r}")

  @app.get("/health")
  async def health():
    status = "draining" if worker.draining else "ok"
    return responses.JSONResponse({"status": status, "task": run.task.mode},
                                  status_code=503 if worker.draining else 200)

  @app.get("/metrics")
  async def metrics():
    return responses.PlainTextResponse(prometheus_text(worker.metrics()))

  return app


def _add_error_handlers(app: fastapi.FastAPI) -> None:
  """{"error": one line} for client errors and unknown routes; 500 with a logged id otherwise."""

  @app.exception_handler(ClientError)
  async def client_error(_, e: ClientError):
    return responses.JSONResponse({"error": str(e)}, status_code=e.status)

  @app.exception_handler(HTTPException)
  async def http_error(_, e: HTTPException):  # unknown routes and methods
    return responses.JSONResponse({"error": str(e.detail)}, status_code=e.status_code)

  @app.exception_handler(Exception)
  async def internal_error(_, e: Exception):
    error_id = new_error_id()
    log.exception("request failed (%s)", error_id, exc_info=e)
    return _internal(error_id)


class _Answers:
  """Submits a job to the worker and turns its updates into the HTTP answer: one JSON result, or
  server-sent events while it runs."""

  def __init__(self, run: LoadedRun, worker: EngineWorker):
    self.run = run
    self.worker = worker

  async def answer(self, request: fastapi.Request, job: Job, stream: bool):
    self.worker.submit(job)
    if stream:
      return responses.StreamingResponse(self.events(job), media_type="text/event-stream")
    loop = asyncio.get_running_loop()
    check_at = loop.time() + _DISCONNECT_POLL_S
    while True:
      try:
        update = await asyncio.wait_for(job.updates.get(), _DISCONNECT_POLL_S)
        if update.error is not None or update.output is not None:
          return self.response(job, update)
      except asyncio.TimeoutError:
        pass
      if loop.time() >= check_at:  # updates may come every step: look at the client by time
        check_at = loop.time() + _DISCONNECT_POLL_S
        if await request.is_disconnected():
          self.worker.cancel(job)
          return responses.Response(status_code=499)  # nobody reads it

  async def events(self, job: Job) -> AsyncIterator[str]:
    decoder = _TextStream(self.run)
    ended = False
    try:
      while True:
        update = await job.updates.get()
        if update.error is not None or update.output is not None:
          ended = True
          response = self.response(job, update)
          if response.status_code != 200:
            yield _sse("error", {**json.loads(response.body), "status": response.status_code})
            return
          rest = decoder.finish()
          if rest:
            yield _sse("token", {"text": rest, "tokens": []})
          yield _sse("done", json.loads(response.body))
          return
        delta = decoder.add(update.tokens)
        if update.tokens:
          yield _sse("token", {"text": delta, "tokens": update.tokens})
        for r in update.retrievals:
          yield _sse("retrieval", {"position": r.position, "ids": r.ids, "scores": r.scores})
    finally:
      if not ended:  # the client went away mid-stream
        self.worker.cancel(job)

  def response(self, job: Job, update: Update) -> responses.JSONResponse:
    """The final answer for an update that carries an error or an output."""
    if isinstance(update.error, ClientError):
      return responses.JSONResponse({"error": str(update.error)}, status_code=update.error.status)
    if isinstance(update.error, InternalError):
      return _internal(update.error.error_id)
    out = update.output
    if isinstance(out, SelfRagResult):
      return responses.JSONResponse({**out.record(), "id": f"req-selfrag-{uuid.uuid4().hex[:8]}"})
    if out.stop_reason == "error":
      error_id = new_error_id()
      log.error("request failed (%s): %s", error_id, out.error)
      return _internal(error_id)
    if out.stop_reason == "cancelled":  # only a draining server cancels a request it answers
      return responses.JSONResponse(
          {"error": f"the server shut down before the request ended (cancelled after "
                    f"{sum(out.generated)} generated tokens)"}, status_code=503)
    return responses.JSONResponse(self.result(job, out))

  def result(self, job: Job, out: RequestOutput) -> dict:
    record = output_record(self.run, out)
    record["id"] = f"req-{job.rid}"
    record["usage"] = {"prompt_tokens": len(out.prompt), "generated_tokens": sum(out.generated),
                       "inserted_tokens": len(out.generated) - sum(out.generated)}
    if job.session is not None and self.worker.has_session(job.session):
      record["session_id"] = job.session
    return record


class _TextStream:
  """Incremental text of an output: each `add` returns the text its tokens add (held back while
  the decoded text ends inside a character); the pieces add up to output_record's text."""

  def __init__(self, run: LoadedRun):
    self.tokenizer = run.tokenizer
    self.tokens: list[int] = []
    self.sent = ""

  def add(self, tokens: list[int]) -> str:
    self.tokens += tokens
    text = output_text(self.tokenizer, self.tokens)
    if text.endswith("\ufffd") or not text.startswith(self.sent):
      return ""
    delta, self.sent = text[len(self.sent):], text
    return delta

  def finish(self) -> str:
    """What was held back."""
    text = output_text(self.tokenizer, self.tokens)
    return text[len(self.sent):] if text.startswith(self.sent) else ""


async def _body(request: fastapi.Request, limit: int) -> bytes:
  """The request body, refused (413) past `limit` bytes without reading the rest."""
  declared = request.headers.get("content-length")
  if declared is not None and declared.isdigit() and int(declared) > limit:
    raise ClientError(413, f"the body has {declared} bytes; the limit is {limit}")
  body = bytearray()
  async for chunk in request.stream():
    body += chunk
    if len(body) > limit:
      raise ClientError(413, f"the body is over the limit of {limit} bytes")
  return bytes(body)


def _sse(event: str, data: dict) -> str:
  return f"event: {event}\ndata: {json.dumps(data)}\n\n"


def _internal(error_id: str) -> responses.JSONResponse:
  return responses.JSONResponse({"error": "internal error", "id": error_id}, status_code=500)
