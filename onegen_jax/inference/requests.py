"""Requests in, results out: prompts from reference-format lines, tokenised as training
tokenises them; gold output streams for replay; JSON results."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from onegen_jax.data.encoding import TaskTokenizer
from onegen_jax.data.records import ROLES, Message, nonblank_lines, prompt_messages
from onegen_jax.inference.engine import RequestOutput
from onegen_jax.inference.types import Candidates

if TYPE_CHECKING:  # run_dir wires the engine with output_text
  from onegen_jax.inference.run_dir import LoadedRun


@dataclasses.dataclass(frozen=True)
class Inputs:
  """What launch.infer reads from a jsonl file, one entry per non-blank line: its number in the
  file, the prompt (messages), its EL candidates (None: unrestricted), its answer prefix (None:
  the model starts) and its generation settings (Request fields: those of SETTINGS it gives)."""

  numbers: list[int]
  prompts: list[tuple[Message, ...]]
  candidates: list[Candidates]
  prefixes: list[str | None]
  settings: list[dict]


def read_requests(path: str) -> list[tuple[Message, ...]]:
  """The prompt of each line of a reference-format jsonl file (see read_input)."""
  return read_input(path).prompts


def read_input(path: str) -> Inputs:
  """Each line's prompt, its messages before the last assistant message
  (records.prompt_messages; system messages included, as in training), its optional
  "candidates" (EL): entity uids for all its mentions, or one list per mention in order, and its
  optional "answer_prefix": text the answer starts with (answer_prefix_tokens), and its optional
  SETTINGS ("stop": a string or a list of them; the penalties; "loop_repeats"). Every bad line is
  named, with its field."""
  inputs, problems = Inputs([], [], [], [], []), []
  for number, line in nonblank_lines(path):
    inputs.numbers.append(number)
    try:
      record = json.loads(line)
    except ValueError as e:
      problems.append(f"{path}:{number}: not JSON: {e}")
      continue
    if not isinstance(record, dict):
      problems.append(f"{path}:{number}: not a JSON object: {line.strip()[:80]}")
      continue
    for field, parse, out in (("messages", _prompt, inputs.prompts),
                              ("candidates", _candidates, inputs.candidates),
                              ("answer_prefix", _answer_prefix, inputs.prefixes)):
      try:
        out.append(parse(record))
      except (ValueError, KeyError, TypeError) as e:
        problems.append(f"{path}:{number}: {field}: {e}")
    inputs.settings.append({})
    for field in [f for f in SETTINGS if f in record]:
      try:
        inputs.settings[-1][field] = SETTINGS[field](record[field])
      except ValueError as e:
        problems.append(f"{path}:{number}: {field}: {e}")
  if problems:
    raise ValueError("\n".join(problems))
  return inputs


def _prompt(record: dict) -> tuple[Message, ...]:
  messages = [Message(m["role"], m["content"]) for m in record["messages"]]
  bad = [m.role for m in messages if m.role not in ROLES or not isinstance(m.content, str)]
  if bad:
    raise ValueError(f"a message with role {bad[0]!r} or without string content")
  prompt = prompt_messages(messages)
  if not prompt:
    raise ValueError("no message before the assistant's (nothing to prompt with)")
  return prompt


def _candidates(record: dict) -> Candidates:
  candidates = record.get("candidates")
  flat = isinstance(candidates, list) and all(isinstance(c, str) for c in candidates)
  nested = isinstance(candidates, list) and all(
      isinstance(c, list) and all(isinstance(u, str) for u in c) for c in candidates)
  if candidates is not None and not (flat or nested):
    raise ValueError(f"expected a list of uids or a list of such lists, got "
                     f"{json.dumps(candidates)[:80]}")
  return candidates


def _answer_prefix(record: dict) -> str | None:
  prefix = record.get("answer_prefix")
  if prefix is not None and not isinstance(prefix, str):
    raise ValueError(f"expected a string, got {json.dumps(prefix)[:80]}")
  return prefix


def _stop(value) -> tuple[str, ...]:
  stop = [value] if isinstance(value, str) else value
  if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
    raise ValueError(f"expected a non-empty string or a list of them, got {json.dumps(value)[:80]}")
  return tuple(stop)


def _number(value) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    raise ValueError(f"expected a number, got {json.dumps(value)[:80]}")
  return float(value)


def _positive(value) -> float:
  if _number(value) <= 0:
    raise ValueError(f"expected a positive number, got {json.dumps(value)}")
  return float(value)


def _loop_repeats(value) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < 0 or value == 1:
    raise ValueError(f"expected 0 (off) or an integer from 2, got {json.dumps(value)[:80]}")
  return value


# The per-line generation settings an input line may carry: Request field -> its parser.
SETTINGS = {"stop": _stop, "presence_penalty": _number, "frequency_penalty": _number,
            "repetition_penalty": _positive, "loop_repeats": _loop_repeats}


def prompt_tokens(run: LoadedRun, requests: list[tuple[Message, ...]], max_len: int,
                  names: Sequence[str] | None = None) -> list[list[int]]:
  """Token ids of each prompt, tokenised as training tokenises the same messages (each message on
  its own, no BOS/EOS): the first tokens of the training sequence of the same conversation. A
  prompt is never cut: ValueError naming every prompt over max_len tokens (names[i], default
  "prompt i"), with its length."""
  encoded = run.tokenizer.tokenize_with_roles(requests, run.task.query_token, 1 << 62)
  names = names or [f"prompt {i}" for i in range(len(requests))]
  too_long = [f"{name}: the prompt has {len(e.tokens)} tokens, over the limit of {max_len}"
              for name, e in zip(names, encoded) if len(e.tokens) > max_len]
  if too_long:
    raise ValueError("\n".join(too_long))
  return [e.tokens.tolist() for e in encoded]


def output_stream(tokenizer: TaskTokenizer, tokens: Sequence[int], prompt_len: int) -> list[int]:
  """What the model itself emits in a training sequence: its tokens after the prompt, without
  what the engine inserts (the CTX span right after a query RET token; the token forced after
  it). Forced through `Engine.generate(force=...)`, it replays a gold answer (teacher forcing)."""
  task, ids = tokenizer.task, tokenizer.ids
  force_after = dict(task.force_after).get(task.query_token)
  open_tag = ids[task.ctx_spans[0][0]] if task.ctx_spans else None
  out, i = [], prompt_len
  while i < len(tokens):
    out.append(tokens[i])
    if tokens[i] == ids[task.query_token] and i + 1 < len(tokens):
      if force_after:
        i += 1  # the forced token
      elif tokens[i + 1] == open_tag and ids[task.ctx_spans[0][1]] in tokens[i + 1:]:
        i = list(tokens).index(ids[task.ctx_spans[0][1]], i + 1)  # to the close tag
    i += 1
  return out


def answer_prefix_tokens(tokenizer: TaskTokenizer, prefix: str) -> list[int]:
  """The tokens an answer prefix forces as the first output-stream tokens (Request.force): the
  text tokenised as the start of an assistant message (as training tokenises one), less what the
  engine inserts itself (output_stream: the token forced after an EL query token, a RAG
  paragraph right after a query token). Its query RET tokens retrieve as generated ones do."""
  return output_stream(tokenizer, tokenizer.tokenize([prefix])[0], 0)


def output_text(tokenizer: TaskTokenizer, tokens: Sequence[int]) -> str:
  """The text of output tokens: every token but EOS, special tokens kept, no clean-up of spaces
  (the text of a prefix is a prefix of the text, so streamed pieces add up to it)."""
  eos = tokenizer.hf.eos_token_id
  return tokenizer.hf.decode([t for t in tokens if t != eos], skip_special_tokens=False,
                             clean_up_tokenization_spaces=False)


def output_record(run: LoadedRun, out: RequestOutput) -> dict:
  """One JSON-ready result: text, retrievals per step, and for EL the linked mentions."""
  text = output_text(run.tokenizer, out.tokens)
  record = {"text": text, "finished": out.finished, "stop_reason": out.stop_reason,
            "retrievals": [{"position": r.position, "ids": r.ids, "scores": r.scores}
                           for r in out.retrievals]}
  if run.task.mode == "el":
    record["plain_text"], record["mentions"] = run.task.linked_mentions(
        text, [r.ids[0] if r.ids else None for r in out.retrievals])
  return record
