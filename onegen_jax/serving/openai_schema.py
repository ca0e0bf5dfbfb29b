"""Request bodies of the OpenAI-compatible routes (openai_api.py), checked as strictly as the
native ones (schema.py, whose `Settings` they share: temperature, top_p, seed, stream, and the
extensions retrieve_k, candidates, answer_prefix). A null field is an absent one (as OpenAI reads
it); an unknown field is a 422, as on the native routes."""

from __future__ import annotations

from typing import Annotated, Literal

import pydantic

from onegen_jax.serving.schema import SelfRagBody, Settings

Text = Annotated[str, pydantic.Field(min_length=1)]


class _Strict(pydantic.BaseModel):
  model_config = pydantic.ConfigDict(extra="forbid", strict=True)

  @pydantic.model_validator(mode="before")
  @classmethod
  def _nulls_are_absent(cls, data):
    return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class TextPart(_Strict):
  """A piece of a message's content in OpenAI's list form (text only)."""

  type: Literal["text"]
  text: str


class ChatMessage(_Strict):
  """content: a string, or text parts (concatenated); name: accepted, not used."""

  role: Literal["system", "user", "assistant"]
  content: str | list[TextPart]
  name: str | None = None

  @property
  def text(self) -> str:
    return (self.content if isinstance(self.content, str)
            else "".join(part.text for part in self.content))


class StreamOptions(_Strict):
  include_usage: bool = False


class _GenerationBody(Settings, _Strict):
  """What both generation routes take: OpenAI's fields, and the extensions (Settings' retrieve_k,
  candidates and answer_prefix; selfrag, repetition_penalty, loop_repeats)."""

  model: str
  max_tokens: int | None = None
  max_completion_tokens: int | None = None  # OpenAI's newer name; it wins over max_tokens
  stop: Text | list[Text] | None = None
  stream_options: StreamOptions | None = None
  n: int | None = None  # 1 only
  presence_penalty: float | None = pydantic.Field(None, ge=-2.0, le=2.0)
  frequency_penalty: float | None = pydantic.Field(None, ge=-2.0, le=2.0)
  user: str | None = None  # accepted, not used
  repetition_penalty: float | None = pydantic.Field(None, ge=0.01, le=100.0)  # 1: off
  loop_repeats: int | None = pydantic.Field(None, ge=0, le=1000)  # 0: off, else >= 2
  selfrag: SelfRagBody | None = None

  @pydantic.field_validator("loop_repeats")
  @classmethod
  def _repeats(cls, value):
    if value == 1:
      raise ValueError("1 would end every request; 0 (off) or at least 2")
    return value

  @property
  def stops(self) -> tuple[str, ...]:
    return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

  @property
  def length(self) -> tuple[int | None, str]:
    """(max_new_tokens, the field that set it)."""
    if self.max_completion_tokens is not None:
      return self.max_completion_tokens, "max_completion_tokens"
    return self.max_tokens, "max_tokens"


class ChatBody(_GenerationBody):
  """POST /v1/chat/completions: every message is the prompt."""

  messages: list[ChatMessage] = pydantic.Field(min_length=1)


class CompletionBody(_GenerationBody):
  """POST /v1/completions: `prompt` as one user message (OpenAI's other prompt forms are
  declared so that they get a 400 naming what is supported, not a type error)."""

  prompt: str | list[str] | list[int] | list[list[int]]


class EmbeddingsBody(_Strict):
  """POST /v1/embeddings. role (extension): "document" (the key of a db document of that text,
  `title` filling the task's document instruction: one for all inputs or one each) or
  "query" (the query vector after the text's prompt)."""

  model: str
  input: Text | Annotated[list[Text], pydantic.Field(min_length=1, max_length=2048)]
  encoding_format: Literal["float", "base64"] = "float"
  user: str | None = None
  role: Literal["document", "query"] = "document"
  title: str | list[str] | None = None

  @property
  def texts(self) -> list[str]:
    return [self.input] if isinstance(self.input, str) else list(self.input)
