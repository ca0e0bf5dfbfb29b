"""Request bodies of the HTTP API, checked strictly (wrong types are errors, not coerced), and
their translation into engine requests: the prompt is tokenised by the one function launch.infer
and training use (`inference.requests.prompt_tokens`), so a reference-format line's messages give
the same tokens over HTTP as through `launch.infer`."""

from __future__ import annotations

import dataclasses
import json
from typing import Literal

import pydantic

from onegen_jax.data.records import Message, prompt_messages
from onegen_jax.inference.requests import answer_prefix_tokens, prompt_tokens
from onegen_jax.inference.run_dir import LoadedRun
from onegen_jax.inference.selfrag import MODES, SelfRagConfig
from onegen_jax.inference.types import Request
from onegen_jax.serving.worker import ClientError


@dataclasses.dataclass(frozen=True)
class Limits:
  """What the server accepts: capacity (cache entries per request: prompt + output), default and
  largest max_new_tokens, default and largest retrieve_k, the largest body in bytes."""

  capacity: int
  max_new_tokens: int
  max_new_tokens_limit: int
  retrieve_k: int
  max_retrieve_k: int
  max_body_bytes: int


class MessageBody(pydantic.BaseModel):
  """A message; its other fields (a reference-format line's positive / negative) are ignored."""

  model_config = pydantic.ConfigDict(extra="ignore", strict=True)
  role: Literal["system", "user", "assistant"]
  content: str


class TurnBody(pydantic.BaseModel):
  """A session's next turn: the user's new message(s), or `prompt` (one user message)."""

  model_config = pydantic.ConfigDict(extra="forbid", strict=True)
  messages: list[MessageBody] | None = None
  prompt: str | None = None
  max_new_tokens: int | None = None
  temperature: float = pydantic.Field(0.0, ge=0.0, le=100.0)
  top_p: float = pydantic.Field(1.0, gt=0.0, le=1.0)
  retrieve_k: int | None = None
  seed: int | None = None
  stream: bool = False
  candidates: list[str] | list[list[str]] | None = None  # inference.types.Candidates as JSON
  answer_prefix: str | None = None  # the answer's first text, forced (as launch.infer's lines)


class SelfRagBody(pydantic.BaseModel):
  """Self-RAG's procedure (a selfrag run only): launch.infer's --selfrag_mode and its settings."""

  model_config = pydantic.ConfigDict(extra="forbid", strict=True)
  mode: Literal[MODES] = "adaptive_retrieval"
  threshold: float = pydantic.Field(0.2, ge=0.0, le=1.0)
  ndocs: int = pydantic.Field(5, ge=1)
  w_rel: float = 1.0
  w_sup: float = 1.0
  w_use: float = 0.5
  use_seq_score: bool = True


class GenerateBody(TurnBody):
  """A new request: the conversation so far (every message before its last assistant message is
  the prompt, as in launch.infer's input lines) or `prompt`; keep_session opens a session;
  selfrag runs Self-RAG's procedure instead of plain one-pass generation."""

  keep_session: bool = False
  selfrag: SelfRagBody | None = None


def selfrag_config(body: GenerateBody, run: LoadedRun, limits: Limits,
                   request: Request) -> SelfRagConfig | None:
  """The Self-RAG settings of a body (None without `selfrag`); ClientError 422 where they do not
  apply, 400 when the prompt leaves no room in the cache."""
  if body.selfrag is None:
    return None
  sr = body.selfrag
  if run.task.name != "selfrag":
    raise ClientError(422, f"selfrag: this server runs a {run.task.name} model")
  if (body.stream or body.keep_session or body.candidates is not None
      or body.answer_prefix is not None):
    raise ClientError(422, "selfrag: stream, keep_session, candidates and answer_prefix do not "
                      "apply")
  if sr.ndocs > limits.max_retrieve_k:
    raise ClientError(422, f"selfrag.ndocs: {sr.ndocs} is over {limits.max_retrieve_k}")
  if len(request.prompt) + 3 + request.max_new_tokens > limits.capacity:
    raise ClientError(400, f"the prompt ({len(request.prompt)} tokens) and max_new_tokens "
                      f"leave no room for a paragraph in the cache ({limits.capacity})")
  return SelfRagConfig(sr.mode, sr.threshold, sr.ndocs, sr.w_rel, sr.w_sup, sr.w_use,
                       sr.use_seq_score, request.max_new_tokens)


def parse(body: bytes, model: type[TurnBody]) -> TurnBody:
  """The body as `model`; ClientError 400 for malformed JSON, 422 for a missing, unknown or
  wrong-typed field (one line: the field and the problem)."""
  try:
    data = json.loads(body)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ClientError(400, f"malformed JSON: {e}") from None
  if not isinstance(data, dict):
    raise ClientError(400, f"the body must be a JSON object, got {type(data).__name__}")
  try:
    return model.model_validate(data)
  except pydantic.ValidationError as e:
    first = e.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "body"
    more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
    raise ClientError(422, f"{where}: {first['msg']}{more}") from None


def engine_request(body: TurnBody, run: LoadedRun, limits: Limits, turn: bool = False
                   ) -> Request:
  """The engine request of a checked body; `turn`: the prompt is a session's new turn (its
  messages only, no assistant message). ClientError 422 for settings out of range, 400 for a
  prompt that does not fit the cache."""
  if (body.messages is None) == (body.prompt is None):
    raise ClientError(422, "give exactly one of `messages` and `prompt`")
  messages = ([Message(m.role, m.content) for m in body.messages] if body.messages is not None
              else [Message("user", body.prompt)])
  if turn and any(m.role == "assistant" for m in messages):
    raise ClientError(422, "messages: a turn holds the user's messages; the assistant's come "
                      "from the session")
  prompt = tuple(messages) if turn else prompt_messages(messages)
  if not prompt:
    raise ClientError(422, "messages: nothing before the assistant's message to prompt with")
  max_new = body.max_new_tokens if body.max_new_tokens is not None else limits.max_new_tokens
  if not 1 <= max_new <= limits.max_new_tokens_limit:
    raise ClientError(422, f"max_new_tokens: {max_new} is out of range [1, "
                      f"{limits.max_new_tokens_limit}]")
  k = body.retrieve_k if body.retrieve_k is not None else limits.retrieve_k
  if not 1 <= k <= limits.max_retrieve_k:
    raise ClientError(422, f"retrieve_k: {k} is out of range [1, {limits.max_retrieve_k}]")
  if body.candidates is not None and run.task.mode != "el":
    raise ClientError(422, "candidates: only entity linking restricts searches to candidates")
  force = (answer_prefix_tokens(run.tokenizer, body.answer_prefix)
           if body.answer_prefix is not None else [])
  if len(force) > max_new:
    raise ClientError(422, f"answer_prefix: {len(force)} tokens, over max_new_tokens={max_new}")
  tokens = prompt_tokens(run, [prompt], max_len=1 << 62)[0]
  if not tokens:
    raise ClientError(422, "messages: the prompt has no tokens")
  if not turn and len(tokens) + 1 > limits.capacity:
    raise ClientError(400, f"the prompt has {len(tokens)} tokens; the cache holds "
                      f"{limits.capacity} per request (prompt + output)")
  return Request(tokens, force=force, candidates=body.candidates, seed=body.seed,
                 max_new_tokens=max_new, retrieve_k=k, temperature=body.temperature,
                 top_p=body.top_p, keep_session=getattr(body, "keep_session", False) or turn)
