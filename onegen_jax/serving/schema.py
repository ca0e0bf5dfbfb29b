"""Request bodies of the native HTTP API, checked strictly (wrong types are errors, not coerced),
and their translation into engine requests: the prompt is tokenised by the one function
launch.infer and training use (`inference.requests.prompt_tokens`), so a reference-format line's
messages give the same tokens over HTTP as through `launch.infer`. The OpenAI-compatible bodies
(openai_schema.py) share `Settings` and the checks here (`engine_request`, `selfrag_config`)."""

from __future__ import annotations

import dataclasses
import json
from typing import Literal

import fastapi
import pydantic
import pydantic.json_schema

from onegen_jax.data.records import Message, prompt_messages
from onegen_jax.inference.requests import answer_prefix_tokens, prompt_tokens
from onegen_jax.inference.run_dir import LoadedRun
from onegen_jax.inference.selfrag import MODES, SelfRagConfig
from onegen_jax.inference.types import Request
from onegen_jax.serving.errors import ClientError


_TYPE_TAGS = ("str", "int", "float", "bool")  # union member tags that look like field names


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


class Settings(pydantic.BaseModel):
  """What a request sets besides its prompt and length, with one meaning and one check on every
  route (the native ones and the OpenAI-compatible ones)."""

  model_config = pydantic.ConfigDict(extra="forbid", strict=True)
  temperature: float = pydantic.Field(0.0, ge=0.0, le=100.0)
  top_p: float = pydantic.Field(1.0, gt=0.0, le=1.0)
  retrieve_k: int | None = None
  seed: int | None = pydantic.Field(None, ge=-(1 << 31), lt=1 << 31)  # the engine's int32 stream
  stream: bool = False
  candidates: list[str] | list[list[str]] | None = None  # inference.types.Candidates as JSON
  answer_prefix: str | None = None  # the answer's first text, forced (as launch.infer's lines)


class TurnBody(Settings):
  """A session's next turn: the user's new message(s), or `prompt` (one user message)."""

  model_config = pydantic.ConfigDict(  # exactly one of them, as the OpenAPI document says
      json_schema_extra={"oneOf": [{"required": ["messages"]}, {"required": ["prompt"]}]})
  messages: list[MessageBody] | None = None
  prompt: str | None = None
  max_new_tokens: int | None = None


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


def selfrag_config(sr: SelfRagBody | None, body: Settings, run: LoadedRun, limits: Limits,
                   request: Request, keep_session: bool = False) -> SelfRagConfig | None:
  """The Self-RAG settings of a request (None without `selfrag`); ClientError 422 where they do
  not apply, 400 when the prompt leaves no room in the cache."""
  if sr is None:
    return None
  if run.task.name != "selfrag":
    raise ClientError(422, f"selfrag: this server runs a {run.task.name} model")
  if (body.stream or keep_session or body.candidates is not None
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


async def read_body(request: fastapi.Request, limit: int) -> bytes:
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


def parse(body: bytes, model: type[pydantic.BaseModel]) -> pydantic.BaseModel:
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
    errors = [(_field(error["loc"]), error["msg"]) for error in e.errors()]
    where = errors[0][0]  # the first field at fault, and every form of it that did not fit
    problems = " or ".join(dict.fromkeys(msg for field, msg in errors if field == where))
    more = sum(field != where for field, _ in errors)
    raise ClientError(422, f"{where}: {problems}" + (f" (and {more} more)" if more else ""))


def _field(loc: tuple) -> str:
  """A pydantic error's location as a field path ("messages.0.content"), without the tags it
  gives the members of a union ("str", "list[str]", "constrained-str")."""
  tag = lambda part: isinstance(part, str) and (not part.isidentifier() or part in _TYPE_TAGS)
  return ".".join(str(part) for part in loc if not tag(part)) or "body"


def native_prompt(body: TurnBody, turn: bool = False) -> tuple[Message, ...]:
  """The prompt of a native body: its messages before their last assistant message (as in
  launch.infer's input lines), or `prompt` as one user message; `turn`: a session's new turn (its
  messages only, no assistant message). ClientError 422 for a body without exactly one of them."""
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
  return prompt


def engine_request(prompt: tuple[Message, ...], body: Settings, max_new_tokens: int | None,
                   run: LoadedRun, limits: Limits, turn: bool = False, keep_session: bool = False,
                   length_field: str = "max_new_tokens", **options) -> Request:
  """The engine request of a prompt and checked settings; `turn`: the prompt is a session's new
  turn (fed after its kept cache); length_field: the body's name of max_new_tokens (in errors);
  options: further Request fields as they are (stop strings, penalties). The prompt is tokenised
  as training tokenises the same messages. ClientError 422 for settings out of range, 400 for a
  prompt that does not fit the cache."""
  max_new = max_new_tokens if max_new_tokens is not None else limits.max_new_tokens
  if not 1 <= max_new <= limits.max_new_tokens_limit:
    raise ClientError(422, f"{length_field}: {max_new} is out of range [1, "
                      f"{limits.max_new_tokens_limit}]")
  k = body.retrieve_k if body.retrieve_k is not None else limits.retrieve_k
  if not 1 <= k <= limits.max_retrieve_k:
    raise ClientError(422, f"retrieve_k: {k} is out of range [1, {limits.max_retrieve_k}]")
  if body.candidates is not None and run.task.mode != "el":
    raise ClientError(422, "candidates: only entity linking restricts searches to candidates")
  force = (answer_prefix_tokens(run.tokenizer, body.answer_prefix)
           if body.answer_prefix is not None else [])
  if len(force) > max_new:
    raise ClientError(422, f"answer_prefix: {len(force)} tokens, over {length_field}={max_new}")
  tokens = prompt_tokens(run, [prompt], max_len=1 << 62)[0]
  if not tokens:
    raise ClientError(422, "messages: the prompt has no tokens")
  if not turn and len(tokens) + 1 > limits.capacity:
    raise ClientError(400, f"the prompt has {len(tokens)} tokens; the cache holds "
                      f"{limits.capacity} per request (prompt + output)")
  return Request(tokens, force=force, candidates=body.candidates, seed=body.seed,
                 max_new_tokens=max_new, retrieve_k=k, temperature=body.temperature,
                 top_p=body.top_p, keep_session=keep_session or turn, **options)


def openapi_body(model: type[pydantic.BaseModel]) -> dict:
  """A route's `openapi_extra`: its JSON body is `model` (in the components: openapi_schemas).
  The route still reads and checks the body itself (`parse`: the size limit, strict types)."""
  ref = {"$ref": f"#/components/schemas/{model.__name__}"}
  return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def openapi_schemas(models: list[type[pydantic.BaseModel]]) -> dict:
  """The JSON schemas of `models` and the models they hold, by name, as OpenAPI components."""
  _, schemas = pydantic.json_schema.models_json_schema(
      [(m, "validation") for m in models], ref_template="#/components/schemas/{model}")
  return schemas["$defs"]
