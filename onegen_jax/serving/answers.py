"""Following a submitted job to its answer, for every route (native and OpenAI-compatible): wait
for its end while watching the client (`final`), or take its updates as they come (`updates`, a
stream); turn the final update into the output or the error it ended with (`outcome`); and
decode its tokens into text as they arrive (`TextStream`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import fastapi

from onegen_jax.inference.requests import output_text
from onegen_jax.inference.run_dir import LoadedRun
from onegen_jax.inference.selfrag import SelfRagResult
from onegen_jax.inference.types import RequestOutput
from onegen_jax.serving.errors import ClientError, InternalError, new_error_id
from onegen_jax.serving.worker import EngineWorker, Job, Update

log = logging.getLogger("onegen_jax.serving")
_DISCONNECT_POLL_S = 0.25  # how often a waiting handler checks that its client is still there


def is_final(update: Update) -> bool:
  return update.error is not None or update.output is not None


async def final(request: fastapi.Request, worker: EngineWorker, job: Job) -> Update | None:
  """The final update of a submitted job; None when its client went away first (the job is then
  cancelled: its slot is freed at the next engine step)."""
  loop = asyncio.get_running_loop()
  check_at = loop.time() + _DISCONNECT_POLL_S
  while True:
    try:
      update = await asyncio.wait_for(job.updates.get(), _DISCONNECT_POLL_S)
      if is_final(update):
        return update
    except asyncio.TimeoutError:
      pass
    if loop.time() >= check_at:  # updates may come every step: look at the client by time
      check_at = loop.time() + _DISCONNECT_POLL_S
      if await request.is_disconnected():
        worker.cancel(job)
        return None


async def updates(worker: EngineWorker, job: Job) -> AsyncIterator[Update]:
  """A submitted job's updates up to its final one. Stopped before that (its client went away
  mid-stream; close it with contextlib.aclosing), it cancels the job."""
  ended = False
  try:
    while not ended:
      update = await job.updates.get()
      ended = is_final(update)
      yield update
  finally:
    if not ended:
      worker.cancel(job)


def outcome(update: Update) -> RequestOutput | SelfRagResult:
  """The output of a final update. Raises its ClientError, or InternalError for an engine
  failure (a request's own "error" is logged here under a new id); a request cancelled by a
  draining server is a ClientError 503."""
  if update.error is not None:
    raise update.error
  out = update.output
  if isinstance(out, RequestOutput) and out.stop_reason == "error":
    error_id = new_error_id()
    log.error("request failed (%s): %s", error_id, out.error)
    raise InternalError(error_id)
  if isinstance(out, RequestOutput) and out.stop_reason == "cancelled":
    raise ClientError(503, f"the server shut down before the request ended (cancelled after "
                      f"{sum(out.generated)} generated tokens)")
  return out


class TextStream:
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
