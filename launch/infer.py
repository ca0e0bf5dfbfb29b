"""One-pass OneGen inference: generation and retrieval in one KV-cached pass.

  python -m launch.infer --workdir=RUN --index=DIR --input=IN.jsonl --output=OUT.jsonl

IN.jsonl: reference-format lines; each line's prompt is every message before its last assistant
message. An EL line may carry "candidates": entity uids for all its mentions, or one list per
mention; its searches are then restricted to them (exact scores against the stored vectors).
OUT.jsonl: one JSON object per request: text, stop_reason, retrievals (position, ids, scores) per
step, and for el the plain text with the linked mentions (character offsets, entity).
Mesh, dtype and process flags (every process runs the same requests; process 0 writes
OUT.jsonl): launch/serving_flags.py.
"""

import json

import jax
from absl import app, flags

from launch import serving_flags
from onegen_jax.inference.engine import Request
from onegen_jax.inference.requests import (output_record, prompt_tokens, read_candidates,
                                           read_requests)
from onegen_jax.inference.run import generation_config, load_index_dir, load_run, make_engine

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.")
_INDEX = flags.DEFINE_string("index", None, "Directory written by launch.build_index.")
_INPUT = flags.DEFINE_string("input", None, "Requests (reference-format jsonl).")
_OUTPUT = flags.DEFINE_string("output", None, "Results (jsonl).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 256, "Generated tokens per request.")
_MAX_RETRIEVALS = flags.DEFINE_integer("max_retrievals", 5, "Retrievals per request (rag).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Requests decoded together.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0: greedy.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass.")
_MAX_PROMPT = flags.DEFINE_integer("max_prompt_len", 1024, "Prompts are cut to this many tokens.")
_CAPACITY = flags.DEFINE_integer("capacity", 2048, "KV-cache entries per request.")
_RETRIEVE_K = flags.DEFINE_integer("retrieve_k", 10, "Results kept per retrieval (first is used).")
flags.mark_flags_as_required(["workdir", "index", "input", "output"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  run = load_run(_WORKDIR.value, _STEP.value, **serving_flags.start())
  index, texts, vectors = load_index_dir(_INDEX.value)
  config = generation_config(
      run.task, _MAX_RETRIEVALS.value, max_new_tokens=_MAX_NEW.value,
      temperature=_TEMPERATURE.value, top_p=_TOP_P.value, batch_size=_BATCH.value,
      capacity=_CAPACITY.value, retrieve_k=_RETRIEVE_K.value)
  candidates = read_candidates(_INPUT.value)
  engine = make_engine(run, index, texts, config, vectors=vectors)
  prompts = prompt_tokens(run, read_requests(_INPUT.value), _MAX_PROMPT.value)
  outputs = engine.run([engine.submit(Request(p, candidates=c))
                        for p, c in zip(prompts, candidates)], progress=True)
  if jax.process_index() != 0:  # every process ran the same requests
    return
  with open(_OUTPUT.value, "w") as f:
    for out in outputs:
      f.write(json.dumps(output_record(run, out)) + "\n")
  print(json.dumps({"requests": len(outputs), "finished": sum(o.finished for o in outputs),
                    "retrievals": sum(len(o.retrievals) for o in outputs), "output": _OUTPUT.value}))


if __name__ == "__main__":
  app.run(main)
