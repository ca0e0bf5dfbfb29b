"""The engine's one owner in a server: a background thread that steps the OneGen engine while
requests arrive from the event loop, so concurrent requests share its batches.

HTTP handlers (asyncio) call `submit` / `cancel`, which only queue a command; the thread admits
queued commands between steps, steps the engine while it is busy, and after every step posts to
each job what is new (output tokens, retrievals) and, once it ended, its output. Posting goes
through `loop.call_soon_threadsafe`, so a job's `updates` queue is read on the event loop only.

Sessions (multi-turn dialogues over one kept cache) are named by the server (`Job.session`); the
thread maps each name to the engine request whose cache it keeps, and a turn continues it.

Other programs on the engine's devices (the embeddings' encoder) run on the thread too, between
steps (`call`): two sharded programs in flight at once can deadlock XLA's CPU collectives
(sharding.wait_on_cpu), and the HTTP handlers' event loop stays free meanwhile.

Failure: an exception from one request's retrieval ends that request (the engine's stop_reason
"error"); an exception from a whole step fails the requests then in the engine (their
`Update.error`), logs it, and replaces the engine by a fresh one from `make_engine`, so the
server keeps serving. `drain(seconds)` (SIGTERM): no new job is admitted, running ones go on until
the deadline and are then cancelled, each told so.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import logging
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from onegen_jax.inference.engine import Engine
from onegen_jax.inference.selfrag import SelfRag, SelfRagConfig, SelfRagResult
from onegen_jax.inference.types import Request, RequestOutput, Retrieval
from onegen_jax.serving.errors import ClientError, InternalError, new_error_id
from onegen_jax.serving.metrics import Stats

log = logging.getLogger("onegen_jax.serving")

_IDLE_WAIT_S = 0.05  # how often an idle thread looks at the drain deadline


@dataclasses.dataclass
class Update:
  """What a job gained since the previous update: output tokens (engine insertions included,
  in order) and retrievals; `output` once it ended (`error` set instead if it failed: a
  ClientError, or an internal error's id)."""

  tokens: list[int]
  retrievals: list[Retrieval]
  output: RequestOutput | SelfRagResult | None = None
  error: Exception | None = None


@dataclasses.dataclass(eq=False)
class Job:
  """One request on its way through the engine. request: a new request, or (with `turn`) the
  settings of a session's next turn; session: the server's name of the session this job keeps
  (new) or continues (turn); turn: the new user turn's token ids."""

  request: Request
  loop: asyncio.AbstractEventLoop
  session: str | None = None
  turn: Sequence[int] | None = None
  selfrag: SelfRagConfig | None = None  # run Self-RAG's procedure (its own engine) instead
  updates: asyncio.Queue = dataclasses.field(default_factory=asyncio.Queue)
  rid: int | None = None
  sent_tokens: int = 0
  sent_retrievals: int = 0

  def post(self, update: Update):
    self.loop.call_soon_threadsafe(self.updates.put_nowait, update)


class EngineWorker:
  """Owns an Engine (from `make_engine`) in a thread. Thread-safe: submit, cancel, close_session,
  drain, has_session, metrics."""

  def __init__(self, make_engine: Callable[[], Engine], max_sessions: int = 64,
               make_selfrag: Callable[[SelfRagConfig], SelfRag] | None = None):
    """make_selfrag: a Self-RAG runner (with its own engine) for a config; jobs with `selfrag`
    run on it between steps of the main engine, all those queued together in one batch."""
    self._make_engine = make_engine
    self.engine = make_engine()
    self._make_selfrag = make_selfrag
    self.max_sessions = max_sessions
    self._lock = threading.Condition()
    self._inbox: list[Job] = []  # jobs to admit
    self._cancels: list[Job] = []
    self._closes: list[str] = []  # sessions to close
    self._calls: list[tuple[concurrent.futures.Future, Callable, tuple]] = []  # to run (`call`)
    self._jobs: dict[int, Job] = {}  # engine request id -> its job (thread only)
    self._sessions: dict[str, int | None] = {}  # name -> engine request kept (None: a turn runs)
    self._kept: dict[str, int] = {}  # name -> the ended request whose cache it keeps (thread only)
    self._drain_at: float | None = None  # set from a signal handler: a plain attribute
    self._stopped = False
    self._stats = Stats(self.engine.config.batch_size)
    self._thread = threading.Thread(target=self._run, name="onegen-engine", daemon=True)

  # -- called from the event loop ----------------------------------------------------------------
  def start(self):
    self._thread.start()

  def submit(self, job: Job):
    """Queues a job (a new request, or a turn of an open session). Raises ClientError 503 while
    draining; 404 for an unknown session, 409 for one whose turn is still running, 429 when
    `max_sessions` are open."""
    with self._lock:
      if self.draining:
        raise ClientError(503, "the server is shutting down")
      if job.turn is not None:
        if job.session not in self._sessions:
          raise ClientError(404, f"unknown session {job.session!r} (never opened, closed, or "
                            "ended by an error or cancellation)")
        if self._sessions[job.session] is None:
          raise ClientError(409, f"session {job.session!r} has a turn running")
        self._sessions[job.session] = None
      elif job.session is not None:
        if len(self._sessions) >= self.max_sessions:
          raise ClientError(429, f"{self.max_sessions} sessions are open (--max_sessions); close "
                            "one with DELETE /v1/sessions/ID")
        self._sessions[job.session] = None
      self._inbox.append(job)
      self._lock.notify()

  def call(self, fn: Callable[..., Any], *args) -> concurrent.futures.Future:
    """Runs fn(*args) on the engine's thread between steps (a program on its devices); its
    result or exception arrives in the future. Raises ClientError 503 while draining."""
    future = concurrent.futures.Future()
    with self._lock:
      if self.draining:
        raise ClientError(503, "the server is shutting down")
      self._calls.append((future, fn, args))
      self._lock.notify()
    return future

  def cancel(self, job: Job):
    """Ends a job early (its client is gone): its slot is freed at the next step."""
    with self._lock:
      self._cancels.append(job)
      self._lock.notify()

  def close_session(self, name: str) -> bool:
    """Forgets an open session (frees its kept cache); False when unknown or a turn runs."""
    with self._lock:
      if self._sessions.get(name, None) is None:
        return False
      self._closes.append(name)
      del self._sessions[name]
      self._lock.notify()
      return True

  def has_session(self, name: str) -> bool:
    with self._lock:
      return name in self._sessions

  def drain(self, seconds: float):
    """Signal-safe (no lock): stop admitting; cancel what still runs `seconds` from now."""
    if self._drain_at is None:
      self._drain_at = time.monotonic() + seconds

  @property
  def draining(self) -> bool:
    return self._drain_at is not None

  def stop(self, timeout: float = 30.0):
    """Cancels everything left and ends the thread."""
    self.drain(0.0)
    self._stopped = True
    with self._lock:
      self._lock.notify()
    self._thread.join(timeout)

  def metrics(self) -> dict[str, float]:
    """Queue length, slots, occupancy and rates over the last window, totals."""
    with self._lock:
      queued = len(self._inbox) + self.engine.waiting
      figures = self._stats.figures()
      figures.update(queue_length=queued, sessions_open=len(self._sessions),
                     slots_busy=self.engine.running, draining=float(self.draining))
    return figures

  # -- the thread -------------------------------------------------------------------------------
  def _run(self):
    while True:
      with self._lock:
        while not (self._inbox or self._cancels or self._closes or self._calls or self.engine.busy
                   or self._stopped or self._drain_due()):
          self._lock.wait(_IDLE_WAIT_S)
        inbox, self._inbox = self._inbox, []
        cancels, self._cancels = self._cancels, []
        closes, self._closes = self._closes, []
        calls, self._calls = self._calls, []
      for future, fn, args in calls:
        if future.set_running_or_notify_cancel():
          try:
            future.set_result(fn(*args))
          except Exception as e:  # pylint: disable=broad-except  (the caller's to handle)
            future.set_exception(e)
      for name in closes:
        self._forget_session_cache(name)
      selfrag = [job for job in inbox if job.selfrag is not None]
      if selfrag:
        self._run_selfrag(selfrag)
      for job in inbox:
        if job.selfrag is None:
          self._admit(job)
      for job in cancels:
        if job.rid is not None and self.engine.cancel(job.rid):
          self._finish(job.rid)
      if self._drain_due():
        for rid in list(self._jobs):
          self.engine.cancel(rid)
          self._finish(rid)
      if self._stopped and not self.engine.busy:
        return
      if self.engine.busy:
        self._step()

  def _drain_due(self) -> bool:
    return self._drain_at is not None and time.monotonic() >= self._drain_at

  def _admit(self, job: Job):
    try:
      if job.turn is not None:
        kept = self._kept[job.session]
        job.rid = self.engine.continue_session(kept, job.turn, **_settings(job.request))
        del self._kept[job.session]
        self.engine.release(kept)
      else:
        job.rid = self.engine.submit(job.request)
    except ValueError as e:  # a prompt or dialogue longer than the cache
      if job.turn is not None:  # the session stays as it was
        with self._lock:
          self._sessions[job.session] = self._kept[job.session]
      else:
        self._end_session(job)
      job.post(Update([], [], error=ClientError(400, str(e))))
      return
    self._jobs[job.rid] = job

  def _run_selfrag(self, jobs: list[Job]):
    """Runs Self-RAG jobs to their end, batched by config (the main engine waits meanwhile)."""
    by_config: dict[SelfRagConfig, list[Job]] = collections.defaultdict(list)
    for job in jobs:
      by_config[job.selfrag].append(job)
    for config, group in by_config.items():
      try:
        results = self._make_selfrag(config).run([job.request.prompt for job in group])
        updates = [Update([], [], output=result) for result in results]
      except Exception:  # pylint: disable=broad-except  (fail these jobs, go on)
        error_id = new_error_id()
        log.error("Self-RAG run failed (%s)\n%s", error_id, traceback.format_exc())
        updates = [Update([], [], error=InternalError(error_id))] * len(group)
      for job, update in zip(group, updates):
        with self._lock:
          self._stats.ended("selfrag" if update.error is None else "error")
        job.post(update)

  def _step(self):
    started = time.monotonic()
    busy = self.engine.running
    try:
      ended = self.engine.step()
    except Exception:  # pylint: disable=broad-except  (fail what was in the engine, go on)
      error_id = new_error_id()
      log.error("engine step failed (%s); failing %d requests and restarting the engine\n%s",
                error_id, len(self._jobs), traceback.format_exc())
      for job in self._jobs.values():
        self._end_session(job)
        job.post(Update([], [], error=InternalError(error_id)))
      self._jobs.clear()
      with self._lock:  # the kept caches were the old engine's
        for name in self._kept:
          self._sessions.pop(name, None)
      self._kept.clear()
      self.engine = self._make_engine()
      return
    generated = retrieved = 0
    for rid, job in self._jobs.items():
      out = self.engine.output(rid)
      new_tokens = out.tokens[job.sent_tokens:]
      generated += sum(out.generated[job.sent_tokens:])
      retrieved += len(out.retrievals) - job.sent_retrievals
      if new_tokens or len(out.retrievals) > job.sent_retrievals:
        job.post(Update(list(new_tokens), out.retrievals[job.sent_retrievals:]))
        job.sent_tokens, job.sent_retrievals = len(out.tokens), len(out.retrievals)
    with self._lock:
      self._stats.add(started, busy, generated, retrieved)
    for rid in ended:
      self._finish(rid)

  def _finish(self, rid: int):
    """Posts an ended request's output; keeps its cache under its session name, else releases
    it."""
    job = self._jobs.pop(rid)
    out = self.engine.output(rid)
    with self._lock:
      self._stats.ended(out.stop_reason)
    if job.session is not None and self.engine.has_session(rid):
      self._kept[job.session] = rid
      with self._lock:
        if job.session in self._sessions:
          self._sessions[job.session] = rid
        else:  # closed while its turn ran
          self._closes.append(job.session)
    else:
      self._end_session(job)
      self.engine.release(rid)
    job.post(Update([], [], output=out))

  def _end_session(self, job: Job):
    """A job that keeps no cache ends its session (an error, a cancellation, a full cache)."""
    if job.session is not None:
      with self._lock:
        self._sessions.pop(job.session, None)

  def _forget_session_cache(self, name: str):
    rid = self._kept.pop(name, None)
    if rid is not None:
      self.engine.close_session(rid)
      self.engine.release(rid)


def _settings(request: Request) -> dict:
  """The per-request settings of a turn's template request (continue_session's arguments)."""
  return {f: getattr(request, f) for f in ("force", "candidates", "max_new_tokens", "retrieve_k",
                                           "temperature", "top_p", "seed")}
