"""One-pass OneGen inference: generation and retrieval in one KV-cached pass.

  python -m launch.infer --workdir=RUN --index=DIR --input=IN.jsonl --output=OUT.jsonl

IN.jsonl: reference-format lines; each line's prompt is every message before its last assistant
message. An EL line may carry "candidates": entity uids for all its mentions, or one list per
mention; its searches are then restricted to them (exact scores against the stored vectors;
with --candidate_prior, combined with the candidates' order: launch.fit_prior).
A line may carry "answer_prefix": text the answer starts with, forced as its first output tokens
(its query RET tokens retrieve as generated ones do; the text written includes it), and its own
"stop" (a string or a list: the request ends once its text holds one, stop_reason "stop"; the
text written keeps it), "presence_penalty", "frequency_penalty", "repetition_penalty" and
"loop_repeats" (default: the flags). A prompt over --max_prompt_len tokens is refused (never cut).
OUT.jsonl: one JSON object per request: text, stop_reason, retrievals (position, ids, scores) per
step, and for el the plain text with the linked mentions (character offsets, entity).
Mesh, dtype and process flags (every process runs the same requests; process 0 writes
OUT.jsonl): launch/serving_flags.py.

Self-RAG (a selfrag run): --selfrag_mode=adaptive_retrieval|always_retrieve|no_retrieval runs
Self-RAG's short-form procedure (onegen_jax/inference/selfrag.py: retrieval decided by
P([Retrieval]) vs --threshold, the model's own query, --ndocs evidence rows continuing one
prefill, critique weights --w_rel/--w_sup/--w_use); each output line then holds the answer,
whether it retrieved, and every evidence continuation's document, text and scores.
"""

import json
import sys

import jax
from absl import app, flags

from launch import serving_flags
from onegen_jax.inference.engine import Request
from onegen_jax.inference.requests import (SETTINGS, answer_prefix_tokens, output_record,
                                           prompt_tokens, read_input)
from onegen_jax.inference.retrieval_policy import (BUDGET_HELP, choose_retrieval,
                                                   device_kb_budget)
from onegen_jax.inference.run_dir import generation_config, load_index_dir, load_run, make_engine
from onegen_jax.inference.selfrag import MODES, SelfRagConfig, selfrag_runner
from onegen_jax.inference.types import host_step
from onegen_jax.retrieval.candidates import RankPrior

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
_MAX_PROMPT = flags.DEFINE_integer("max_prompt_len", 1024, "Longest prompt in tokens: an input "
                                   "with a longer one is refused.")
_CAPACITY = flags.DEFINE_integer("capacity", 2048, "KV-cache entries per request.")
_RETRIEVE_K = flags.DEFINE_integer("retrieve_k", 10, "Results kept per retrieval (first is used).")
_PRESENCE = flags.DEFINE_float("presence_penalty", 0.0, "Minus this from the logit of every "
                               "token the output holds (a line's own: \"presence_penalty\").")
_FREQUENCY = flags.DEFINE_float("frequency_penalty", 0.0, "Minus this x its count in the output "
                                "from a token's logit.")
_REPETITION = flags.DEFINE_float("repetition_penalty", 1.0, "HF's: the logit of a token of the "
                                 "prompt or output / this if positive, x this if not; 1: off.")
_LOOP_REPEATS = flags.DEFINE_integer("loop_repeats", 0, "End a request whose output ends in one "
                                     "span (of at most GenerationConfig.loop_max_span tokens) "
                                     "repeated this many times, its copies covering at least "
                                     "loop_min_tokens (16) tokens (stop_reason \"repetition\"); "
                                     "0: off.")
_NOVEL = flags.DEFINE_bool("novel_documents", False, "RAG: a retrieval inserts the best document "
                           "its request has not inserted yet (the host step only).")
_PRIOR = flags.DEFINE_string("candidate_prior", "", "EL: a prior written by launch.fit_prior; "
                             "searches among a line's candidates then rank by cosine + weight x "
                             "log P(gold at the candidate's rank).")
_TASK = flags.DEFINE_string("task", None, "Checked against the run's task (default: the run's).")
_SELFRAG_MODE = flags.DEFINE_enum("selfrag_mode", None, list(MODES), "selfrag: Self-RAG's "
                                  "procedure (default: plain one-pass generation).")
_THRESHOLD = flags.DEFINE_float("threshold", 0.2, "selfrag adaptive_retrieval: retrieve when "
                                "P([Retrieval]) / (P([Retrieval]) + P([No Retrieval])) exceeds it.")
_NDOCS = flags.DEFINE_integer("ndocs", 5, "selfrag: documents retrieved, one continuation each.")
_W_REL = flags.DEFINE_float("w_rel", 1.0, "selfrag: weight of the relevance score.")
_W_SUP = flags.DEFINE_float("w_sup", 1.0, "selfrag: weight of the support score.")
_W_USE = flags.DEFINE_float("w_use", 0.5, "selfrag: weight of the utility score.")
_SEQ_SCORE = flags.DEFINE_bool("use_seq_score", True, "selfrag: add exp(mean token log-prob).")
_STEPS_PER_DISPATCH = flags.DEFINE_integer(
    "steps_per_dispatch", 1, "Decode steps per compiled call: > 1 runs the device loop "
    "(onegen_jax/inference/device_loop.py: the index's vectors on the mesh, search and insertion "
    "inside the loop); 1: the host step. Self-RAG's procedure always runs on the host step.")
_KB_BUDGET = flags.DEFINE_integer("device_kb_budget_mib", 0, BUDGET_HELP)
flags.mark_flags_as_required(["workdir", "index", "input", "output"])


def _read_requests(run) -> tuple:
  """--input's lines (read_input), their prompts' tokens and each line's forced answer-prefix
  tokens; app.UsageError naming the line for a prompt over --max_prompt_len, a prefix over
  --max_new_tokens, or a per-line setting or prefix that Self-RAG's procedure does not take."""
  inputs = read_input(_INPUT.value)
  forced = [answer_prefix_tokens(run.tokenizer, p) if p is not None else []
            for p in inputs.prefixes]
  too_long = [f"{_INPUT.value}:{n}: answer_prefix: {len(f)} tokens, over --max_new_tokens="
              f"{_MAX_NEW.value}"
              for n, f in zip(inputs.numbers, forced) if len(f) > _MAX_NEW.value]
  if too_long or (_SELFRAG_MODE.value and any(p is not None for p in inputs.prefixes)):
    raise app.UsageError("\n".join(too_long)
                         or "answer_prefix: Self-RAG's --selfrag_mode takes none")
  if _SELFRAG_MODE.value and any(inputs.settings):
    raise app.UsageError(f"{', '.join(SETTINGS)}: Self-RAG's --selfrag_mode takes none per line")
  try:
    prompts = prompt_tokens(run, inputs.prompts, _MAX_PROMPT.value,
                            names=[f"{_INPUT.value}:{n}" for n in inputs.numbers])
  except ValueError as e:
    raise app.UsageError(f"{e}\n(--max_prompt_len={_MAX_PROMPT.value})") from e
  return inputs, prompts, forced


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  run = load_run(_WORKDIR.value, _STEP.value, **serving_flags.start())
  if _TASK.value and _TASK.value != run.task.name:
    raise app.UsageError(f"--task={_TASK.value}, but {_WORKDIR.value} is a {run.task.name} run")
  if _SELFRAG_MODE.value and run.task.name != "selfrag":
    raise app.UsageError(f"--selfrag_mode is Self-RAG's; {_WORKDIR.value} is a {run.task.name} run")
  index, texts, vectors = load_index_dir(_INDEX.value)
  steps = 1 if _SELFRAG_MODE.value else _STEPS_PER_DISPATCH.value  # Self-RAG: the host step
  prior = RankPrior.load(_PRIOR.value) if _PRIOR.value else None
  try:
    line, device = choose_retrieval(run, index, texts, vectors, prior, steps,
                                    device_kb_budget(run.mesh, _KB_BUDGET.value))
  except (KeyError, ValueError) as e:
    raise app.UsageError(f"{_INDEX.value}: {e}") from e
  if jax.process_index() == 0:
    print(line, file=sys.stderr)
  settings = dict(max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value,
                  top_p=_TOP_P.value, batch_size=_BATCH.value, capacity=_CAPACITY.value,
                  retrieve_k=_RETRIEVE_K.value, presence_penalty=_PRESENCE.value,
                  frequency_penalty=_FREQUENCY.value, repetition_penalty=_REPETITION.value,
                  loop_repeats=_LOOP_REPEATS.value, steps_per_dispatch=_STEPS_PER_DISPATCH.value,
                  novel_documents=_NOVEL.value)
  config = generation_config(run.task, _MAX_RETRIEVALS.value, **settings)
  inputs, prompts, forced = _read_requests(run)
  if _SELFRAG_MODE.value:
    selfrag = selfrag_runner(run, index, texts, host_step(config))(SelfRagConfig(
        _SELFRAG_MODE.value, _THRESHOLD.value, _NDOCS.value, _W_REL.value, _W_SUP.value,
        _W_USE.value, _SEQ_SCORE.value, _MAX_NEW.value))
    records = [r.record() for r in selfrag.run(prompts)]
  else:
    engine = make_engine(run, index, texts, config, vectors=vectors, prior=prior, device=device)
    outputs = engine.run([engine.submit(Request(p, force=f, candidates=c, **s))
                          for p, f, c, s in zip(prompts, forced, inputs.candidates,
                                                inputs.settings)], progress=True)
    records = [output_record(run, out) for out in outputs]
  if jax.process_index() != 0:  # every process ran the same requests
    return
  with open(_OUTPUT.value, "w") as f:
    for record in records:
      f.write(json.dumps(record) + "\n")
  summary = {"requests": len(records), "output": _OUTPUT.value}
  if _SELFRAG_MODE.value:
    summary["retrieved"] = sum(r["retrieved"] for r in records)
  else:
    summary.update(finished=sum(o.finished for o in outputs),
                   retrievals=sum(len(o.retrievals) for o in outputs))
  print(json.dumps(summary))


if __name__ == "__main__":
  app.run(main)
