"""Serves a trained OneGen run over HTTP: one-pass RAG or entity linking, continuously batched.

  python -m launch.serve --workdir=RUN --index=DIR [--task=el|multihop|selfrag] [--host=127.0.0.1 --port=8000]

DIR: what launch.build_index wrote. The engine runs in one background thread that owns the
device; HTTP handlers queue requests and await them, so concurrent requests share its batches
(--max_batch slots, --capacity cache entries each). The API, its errors and its streaming:
onegen_jax/serving/app.py. SIGTERM (or Ctrl-C): stop accepting, let running requests finish for
--drain_s seconds, then end those still running with 503 / an SSE `error` event, and exit.
Mesh and dtype flags: launch/serving_flags.py (one process).

Beside the native /v1/generate and sessions, OpenAI's API (onegen_jax/serving/openai_api.py):
/v1/chat/completions, /v1/completions (streaming as OpenAI streams), /v1/embeddings (a document's
key as build_index stores it, or a query vector) and /v1/models, the model named
--served_model_name. --api_key (or ONEGEN_API_KEYS): every /v1/ route wants `Authorization:
Bearer KEY`; without a key the server is open (it logs a warning).

  curl -s localhost:8000/v1/generate -d '{"prompt": "...", "max_new_tokens": 64}'
  curl -s localhost:8000/v1/chat/completions -H "Authorization: Bearer $KEY" \
      -d '{"model": "demo", "messages": [{"role": "user", "content": "..."}]}'
"""

import logging
import os
import signal

import jax
import uvicorn
from absl import app, flags

from launch import serving_flags
from onegen_jax.data.tasks import TASKS
from onegen_jax.inference.retrieval_policy import (BUDGET_HELP, choose_retrieval,
                                                   device_kb_budget)
from onegen_jax.inference.run_dir import generation_config, load_index_dir, load_run, make_engine
from onegen_jax.inference.selfrag import selfrag_runner
from onegen_jax.inference.types import host_step
from onegen_jax.retrieval.candidates import RankPrior
from onegen_jax.serving.app import create_app
from onegen_jax.serving.schema import Limits
from onegen_jax.serving.worker import EngineWorker

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.")
_INDEX = flags.DEFINE_string("index", None, "Directory written by launch.build_index.")
_TASK = flags.DEFINE_enum("task", None, sorted(TASKS), "The run's task (its configs/ name), "
                          "checked against the run (default: the run's), as launch.infer's.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.")
_PORT = flags.DEFINE_integer("port", 8000, "Port to listen on.")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 8, "Requests decoded together (cache rows).")
_CAPACITY = flags.DEFINE_integer("capacity", 2048, "Cache entries per request: prompt, "
                                 "insertions and output.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 256, "A request's default max_new_tokens.")
_MAX_NEW_LIMIT = flags.DEFINE_integer("max_new_tokens_limit", 0, "The largest max_new_tokens a "
                                      "request may ask (0: --capacity - 1).")
_MAX_RETRIEVALS = flags.DEFINE_integer("max_retrievals", 5, "Retrievals per request (rag).")
_RETRIEVE_K = flags.DEFINE_integer("retrieve_k", 10, "A request's default results per retrieval.")
_PRIOR = flags.DEFINE_string("candidate_prior", "", "EL: a prior written by launch.fit_prior; "
                             "a request's candidates then rank by cosine + weight x log P(gold "
                             "at the candidate's rank).")
_MAX_RETRIEVE_K = flags.DEFINE_integer("max_retrieve_k", 100, "The largest retrieve_k.")
_MAX_BODY = flags.DEFINE_integer("max_body_bytes", 1 << 20, "Larger request bodies get 413.")
_MAX_SESSIONS = flags.DEFINE_integer("max_sessions", 64, "Open sessions (kept caches) at most.")
_DRAIN_S = flags.DEFINE_float("drain_s", 30.0, "On SIGTERM, how long running requests may go "
                              "on before they are ended.")
_MODEL_NAME = flags.DEFINE_string("served_model_name", None, "The model's name on the OpenAI "
                                  "routes (a request's `model` must be it; default: the "
                                  "--workdir's basename).")
_STEPS_PER_DISPATCH = flags.DEFINE_integer(
    "steps_per_dispatch", 1, "Decode steps per compiled call: > 1 runs the device loop "
    "(onegen_jax/inference/device_loop.py: the index's vectors on the mesh, search and insertion "
    "inside the loop; the worker admits requests and posts tokens between calls); 1: the host "
    "step. Self-RAG's procedure always runs on the host step.")
_API_KEYS = flags.DEFINE_multi_string(
    "api_key", [], "A key /v1/ requests must bear (`Authorization: Bearer KEY`); repeat the flag "
    "or separate keys by commas (default: the env ONEGEN_API_KEYS, comma-separated; none: open).")
_KB_BUDGET = flags.DEFINE_integer("device_kb_budget_mib", 0, BUDGET_HELP)
flags.mark_flags_as_required(["workdir", "index"])


class _DrainingServer(uvicorn.Server):
  """uvicorn's server, telling the engine worker to drain when a shutdown signal arrives."""

  def __init__(self, config: uvicorn.Config, worker: EngineWorker, drain_s: float):
    super().__init__(config)
    self.worker, self.drain_s = worker, drain_s

  def handle_exit(self, sig, frame):
    """Drains, then shuts down (a second Ctrl-C: at once). Unlike uvicorn's own handler, the
    signal is not raised again after shutdown: a drained server exits 0."""
    self.worker.drain(self.drain_s)  # signal-safe: sets a deadline
    if self.should_exit and sig == signal.SIGINT:
      self.force_exit = True
    self.should_exit = True


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  run = load_run(_WORKDIR.value, _STEP.value, **serving_flags.start())
  if jax.process_count() > 1:
    raise app.UsageError("launch.serve runs as one process (its devices may still be a mesh)")
  if _TASK.value and _TASK.value != run.task.name:
    raise app.UsageError(f"--task={_TASK.value}, but {_WORKDIR.value} is a {run.task.name} run")
  index, texts, vectors = load_index_dir(_INDEX.value)
  prior = RankPrior.load(_PRIOR.value) if _PRIOR.value else None
  try:
    retrieval, device = choose_retrieval(run, index, texts, vectors, prior,
                                         _STEPS_PER_DISPATCH.value,
                                         device_kb_budget(run.mesh, _KB_BUDGET.value))
  except (KeyError, ValueError) as e:
    raise app.UsageError(f"{_INDEX.value}: {e}") from e
  config = generation_config(run.task, _MAX_RETRIEVALS.value, max_new_tokens=_MAX_NEW.value,
                             batch_size=_MAX_BATCH.value, capacity=_CAPACITY.value,
                             retrieve_k=_RETRIEVE_K.value,
                             steps_per_dispatch=_STEPS_PER_DISPATCH.value)
  limits = Limits(capacity=_CAPACITY.value, max_new_tokens=_MAX_NEW.value,
                  max_new_tokens_limit=_MAX_NEW_LIMIT.value or _CAPACITY.value - 1,
                  retrieve_k=_RETRIEVE_K.value, max_retrieve_k=_MAX_RETRIEVE_K.value,
                  max_body_bytes=_MAX_BODY.value)
  worker = EngineWorker(lambda: make_engine(run, index, texts, config, vectors=vectors,
                                            prior=prior, device=device),
                        max_sessions=_MAX_SESSIONS.value,
                        make_selfrag=(selfrag_runner(run, index, texts, host_step(config))
                                      if run.task.name == "selfrag" else None))
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  logging.info("%s", retrieval)
  keys = _api_keys()
  if not keys:
    logging.warning("no API key (--api_key, ONEGEN_API_KEYS): the /v1/ routes are open to "
                    "whoever reaches %s:%d", _HOST.value, _PORT.value)
  model_name = _MODEL_NAME.value or os.path.basename(os.path.normpath(_WORKDIR.value))
  server = _DrainingServer(
      uvicorn.Config(create_app(run, worker, limits, model_name, keys), host=_HOST.value,
                     port=_PORT.value,
                     timeout_graceful_shutdown=int(_DRAIN_S.value) + 10, log_level="info"),
      worker, _DRAIN_S.value)
  server.run()


def _api_keys() -> list[str]:
  """--api_key's keys (each value split at commas), else ONEGEN_API_KEYS's."""
  given = _API_KEYS.value or [os.environ.get("ONEGEN_API_KEYS", "")]
  return [key.strip() for value in given for key in value.split(",") if key.strip()]


if __name__ == "__main__":
  app.run(main)
