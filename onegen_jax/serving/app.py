"""The HTTP API of a OneGen server (FastAPI on uvicorn; see launch/serve.py).

  POST   /v1/generate                 messages or prompt -> text, retrievals, EL mentions
                                      ("answer_prefix": the answer's start, forced)
  POST   /v1/sessions/{id}/turns      a user turn continued over the session's kept cache
  DELETE /v1/sessions/{id}            frees a session's cache
  GET    /health                      200 {"status": "ok"}, 503 while shutting down
  GET    /metrics                     Prometheus text: queue, occupancy, tokens/s, retrievals/s
  /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models: OpenAI's API (openai_api.py)

A result is `inference.requests.output_record` (what launch.infer writes per line: text,
finished, stop_reason, retrievals, and for EL plain_text and mentions) plus `id`, `usage` and,
for a session, `session_id`. A selfrag model's request with "selfrag": {"mode", "threshold",
"ndocs", "w_rel", "w_sup", "w_use", "use_seq_score"} runs Self-RAG's procedure (its own engine,
batched with the other Self-RAG requests queued at the same time) and gets what launch.infer
--selfrag_mode writes (answer, retrieved, evidence with scores). With "stream": true the answer is server-sent events: `token`
({"text": the new text, "tokens": their ids}; the texts add up to the result's text),
`retrieval` ({"position", "ids", "scores"}), then `done` (the result) or `error`.

With API keys (launch.serve --api_key), every /v1/ request needs `Authorization: Bearer KEY`
(else 401); /health and /metrics stay open.

Errors: {"error": one line} with 400 (malformed JSON, a prompt longer than the cache), 404
(unknown session), 409 (a session's turn already running), 413 (body over the limit), 422 (a
missing, unknown, wrong-typed or out-of-range field), 429 (too many sessions), 503 (shutting
down); an internal error is 500 {"error": "internal error", "id"} with the traceback logged
under that id, and fails that request only. A client that goes away cancels its request (its
slot is freed at the next engine step). The OpenAI routes answer errors in OpenAI's shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence

import fastapi
from fastapi import responses
from starlette.exceptions import HTTPException

from onegen_jax.inference.embeddings import Embedder
from onegen_jax.inference.requests import output_record
from onegen_jax.inference.run_dir import LoadedRun
from onegen_jax.inference.selfrag import SelfRagResult
from onegen_jax.inference.types import RequestOutput
from onegen_jax.serving import answers, openai_api, schema
from onegen_jax.serving.metrics import prometheus_text
from onegen_jax.serving.errors import ClientError, InternalError, new_error_id
from onegen_jax.serving.worker import EngineWorker, Job

log = logging.getLogger("onegen_jax.serving")


def create_app(run: LoadedRun, worker: EngineWorker, limits: schema.Limits,
               model_name: str, api_keys: Sequence[str] = ()) -> fastapi.FastAPI:
  """The API over a started-or-not worker (the app's lifespan starts and stops it). model_name:
  the model the OpenAI routes serve; api_keys: the keys /v1/ requests must bear (none: open)."""

  @contextlib.asynccontextmanager
  async def lifespan(_):
    worker.start()
    yield
    await asyncio.to_thread(worker.stop)

  app = fastapi.FastAPI(title="onegen_jax", lifespan=lifespan)
  _add_error_handlers(app)
  if api_keys:
    app.add_middleware(openai_api.BearerKeys, keys=api_keys)
  _add_native_routes(app, run, worker, limits)
  openai_api.add_routes(app, openai_api.Served(run, worker, limits, Embedder(run, limits.capacity),
                                               model_name, int(time.time())))
  _describe_bodies(app, [schema.GenerateBody, schema.TurnBody, *openai_api.BODIES])
  return app


def _add_native_routes(app: fastapi.FastAPI, run: LoadedRun, worker: EngineWorker,
                       limits: schema.Limits) -> None:
  """/v1/generate, the sessions' routes, /health and /metrics."""
  native = _Native(run, worker)

  @app.post("/v1/generate", openapi_extra=schema.openapi_body(schema.GenerateBody))
  async def generate(request: fastapi.Request):
    body = schema.parse(await schema.read_body(request, limits.max_body_bytes),
                        schema.GenerateBody)
    prepared = schema.engine_request(schema.native_prompt(body), body, body.max_new_tokens, run,
                                     limits, keep_session=body.keep_session)
    job = Job(prepared, asyncio.get_running_loop(),
              session=uuid.uuid4().hex if body.keep_session else None,
              selfrag=schema.selfrag_config(body.selfrag, body, run, limits, prepared,
                                            keep_session=body.keep_session))
    return await native.answer(request, job, body.stream)

  @app.post("/v1/sessions/{session_id}/turns", openapi_extra=schema.openapi_body(schema.TurnBody))
  async def turn(session_id: str, request: fastapi.Request):
    body = schema.parse(await schema.read_body(request, limits.max_body_bytes), schema.TurnBody)
    if not worker.has_session(session_id):  # before tokenising: the common mistake first
      raise ClientError(404, f"unknown session {session_id!r}")
    engine_request = schema.engine_request(schema.native_prompt(body, turn=True), body,
                                           body.max_new_tokens, run, limits, turn=True)
    job = Job(engine_request, asyncio.get_running_loop(), session=session_id,
              turn=engine_request.prompt)
    return await native.answer(request, job, body.stream)

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


def error_body(e: ClientError | InternalError) -> tuple[int, dict]:
  """(status, body) of a native route's error: {"error": one line}, and an internal error's id."""
  if isinstance(e, InternalError):
    return 500, {"error": "internal error", "id": e.error_id}
  return e.status, {"error": str(e)}


def _add_error_handlers(app: fastapi.FastAPI) -> None:
  """Client errors and unknown routes in the route's shape (native or OpenAI's); any other
  exception is a 500 with an id, logged with its traceback."""

  def answer(request: fastapi.Request, e: ClientError | InternalError) -> responses.JSONResponse:
    shape = openai_api.error_body if openai_api.serves(request.url.path) else error_body
    status, body = shape(e)
    return responses.JSONResponse(body, status_code=status)

  @app.exception_handler(ClientError)
  async def client_error(request, e: ClientError):
    return answer(request, e)

  @app.exception_handler(InternalError)
  async def engine_error(request, e: InternalError):  # logged where it was raised
    return answer(request, e)

  @app.exception_handler(HTTPException)
  async def http_error(request, e: HTTPException):  # unknown routes and methods
    return answer(request, ClientError(e.status_code, str(e.detail)))

  @app.exception_handler(Exception)
  async def internal_error(request, e: Exception):
    error_id = new_error_id()
    log.exception("request failed (%s)", error_id, exc_info=e)
    return answer(request, InternalError(error_id))


def _describe_bodies(app: fastapi.FastAPI, models: list) -> None:
  """Puts the JSON schemas of the bodies the routes parse themselves (schema.openapi_body) into
  the OpenAPI document's components."""
  default = app.openapi

  def openapi() -> dict:
    if app.openapi_schema is None:
      spec = default()
      spec.setdefault("components", {}).setdefault("schemas", {}).update(
          schema.openapi_schemas(models))
    return app.openapi_schema

  app.openapi = openapi


class _Native:
  """The native routes' answers: one JSON result, or server-sent events while it runs."""

  def __init__(self, run: LoadedRun, worker: EngineWorker):
    self.run = run
    self.worker = worker

  async def answer(self, request: fastapi.Request, job: Job, stream: bool):
    self.worker.submit(job)
    if stream:
      return responses.StreamingResponse(self.events(job), media_type="text/event-stream")
    update = await answers.final(request, self.worker, job)
    if update is None:
      return responses.Response(status_code=499)  # nobody reads it
    return responses.JSONResponse(self.result(job, answers.outcome(update)))

  async def events(self, job: Job) -> AsyncIterator[str]:
    decoder = answers.TextStream(self.run)
    try:
      async with contextlib.aclosing(answers.updates(self.worker, job)) as updates:
        async for update in updates:
          if answers.is_final(update):
            result = self.result(job, answers.outcome(update))
            rest = decoder.finish()
            if rest:
              yield _sse("token", {"text": rest, "tokens": []})
            yield _sse("done", result)
            return
          delta = decoder.add(update.tokens)
          if update.tokens:
            yield _sse("token", {"text": delta, "tokens": update.tokens})
          for r in update.retrievals:
            yield _sse("retrieval", {"position": r.position, "ids": r.ids, "scores": r.scores})
    except (ClientError, InternalError) as e:
      status, body = error_body(e)
      yield _sse("error", {**body, "status": status})

  def result(self, job: Job, out: RequestOutput | SelfRagResult) -> dict:
    if isinstance(out, SelfRagResult):
      return {**out.record(), "id": f"req-selfrag-{uuid.uuid4().hex[:8]}"}
    record = output_record(self.run, out)
    record["id"] = f"req-{job.rid}"
    record["usage"] = {"prompt_tokens": len(out.prompt), "generated_tokens": sum(out.generated),
                       "inserted_tokens": len(out.generated) - sum(out.generated)}
    if job.session is not None and self.worker.has_session(job.session):
      record["session_id"] = job.session
    return record


def _sse(event: str, data: dict) -> str:
  return f"event: {event}\ndata: {json.dumps(data)}\n\n"
