"""The server's engine thread (serving.worker.EngineWorker) in process: what a failed compiled
step does to the requests in the engine, to the sessions it kept, and to the requests after it;
other work it runs between steps (`call`)."""

import asyncio
import threading

import numpy as np
import pytest

from conftest import E2E_CONFIG as CONFIG
from onegen_jax.inference.requests import prompt_tokens, read_requests
from onegen_jax.inference.run_dir import encode_db, load_run, make_engine
from onegen_jax.inference.types import Request
from onegen_jax.retrieval.index import ExactIndex
from onegen_jax.serving.errors import ClientError, InternalError
from onegen_jax.serving.worker import EngineWorker, Job


def final_update(loop: asyncio.AbstractEventLoop, job: Job):
  """The job's last update (its output or its error), waiting on the worker's thread."""
  async def last():
    while True:
      update = await asyncio.wait_for(job.updates.get(), 300)
      if update.error is not None or update.output is not None:
        return update
  return loop.run_until_complete(last())


@pytest.mark.parametrize("trained", ["multihop"], indirect=True)
def test_a_failed_step_fails_its_requests_and_a_fresh_engine_serves_the_next(trained):
  """The first engine's second step raises (as a device error would): both requests in it get
  the same InternalError, the session one of them opened is gone, and the worker's new engine
  answers the next requests as an engine of its own does."""
  _, _, data, root, _ = trained
  run = load_run(str(root / "run"))
  vectors, uids, texts, _ = encode_db(run, f"{data}/db.jsonl", str(root / "worker_vectors"))
  index = ExactIndex().build(np.asarray(vectors), uids)
  prompts = prompt_tokens(run, read_requests(f"{data}/dev.jsonl"), 512)[:2]
  engines = []

  def make():
    engine = make_engine(run, index, texts, CONFIG)
    if not engines:  # the first engine fails at its second step
      steps, real_step = [], engine.step

      def step():
        steps.append(1)
        if len(steps) == 2:
          raise RuntimeError("device lost")
        return real_step()
      engine.step = step
    engines.append(engine)
    return engine

  loop = asyncio.new_event_loop()
  worker = EngineWorker(make)
  try:
    failed = [Job(Request(prompts[0]), loop, session="s0"), Job(Request(prompts[1]), loop)]
    for job in failed:
      worker.submit(job)
    assert worker.has_session("s0")
    worker.start()
    errors = [final_update(loop, job).error for job in failed]
    assert all(isinstance(e, InternalError) for e in errors)
    assert errors[0].error_id == errors[1].error_id
    assert not worker.has_session("s0")  # ended before the errors were posted

    after = [Job(Request(p), loop) for p in prompts]
    for job in after:
      worker.submit(job)
    got = [final_update(loop, job).output for job in after]
    # The engine is replaced after the errors are posted, before the thread admits anything new.
    assert len(engines) == 2 and worker.engine is engines[1]
  finally:
    worker.stop()
    loop.close()
  want = make_engine(run, index, texts, CONFIG).generate(prompts)
  assert [(o.tokens, o.stop_reason) for o in got] == [(o.tokens, o.stop_reason) for o in want]
  assert [[r.ids for r in o.retrievals] for o in got] == [[r.ids for r in o.retrievals]
                                                          for o in want]


class _IdleEngine:
  """What the worker reads of an engine that never has work."""

  config = CONFIG
  busy, waiting, running = False, 0, 0


def test_a_call_runs_on_the_engine_thread_and_returns_its_result_or_exception():
  worker = EngineWorker(_IdleEngine)
  worker.start()
  try:
    assert worker.call(lambda: threading.current_thread().name).result(30) == "onegen-engine"
    with pytest.raises(ValueError, match="invalid literal"):
      worker.call(int, "x").result(30)
    worker.drain(60.0)
    with pytest.raises(ClientError, match="shutting down"):
      worker.call(int, "1")
  finally:
    worker.stop()
