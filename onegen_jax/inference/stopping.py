"""The engine's host-side generation controls: a request's settings checked at submit, and the
stops after each output token (EOS, a stop string in the decoded tail of the output, an n-gram
loop: one span repeated to the end of the output stream, max_new_tokens)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from onegen_jax.inference.types import GenerationConfig, Request, RequestOutput

# Tokens decoded before a stop string's bytes: a character cut by the window's start, a leading
# space that a SentencePiece decoder drops at the start of a text.
STOP_CONTEXT = 4


def stop_found(decode: Callable[[Sequence[int]], str], tokens: Sequence[int],
               generated: Sequence[bool], stop: Sequence[str]) -> bool:
  """Whether a stop string occurs in the text of an output's last tokens (RequestOutput.tokens
  and .generated): those after the engine's last insertion, at most the longest stop string's
  UTF-8 bytes plus STOP_CONTEXT of them (a token decodes to a byte at least). Checked after each
  output token, a stop string spanning several tokens is found at the token that completes it."""
  n = max(len(s.encode()) for s in stop) + STOP_CONTEXT
  inserted = [i for i, g in enumerate(generated[-n:]) if not g]
  tail = list(tokens[-n:])[inserted[-1] + 1 if inserted else 0:]
  text = decode(tail)
  return any(s in text for s in stop)


def loop_span(stream: Sequence[int], repeats: int, max_span: int, min_tokens: int = 0) -> int:
  """The shortest span s (1 <= s <= max_span) of which c_s copies in a row end `stream`
  (output-stream token ids), or 0 when none does; c_s = max(repeats, ceil(min_tokens / s)): the
  copies cover at least min_tokens tokens, so a short span must repeat more often. Span s
  repeats c_s times when each of the stream's last s x (c_s - 1) tokens equals the token s
  before it: checked for every s at once on a [max_span, J] grid."""
  spans = np.arange(1, max_span + 1)  # [S]
  copies = np.maximum(repeats, -(-min_tokens // spans))  # c_s [S]
  tail = np.asarray(stream[-int((spans * copies).max()):], np.int64)
  n = len(tail)
  if n < repeats:
    return 0
  compared = spans * (copies - 1)  # [S]: the last tokens each equal to the one s before them
  back = np.arange(1, int(compared.max()) + 1)[None]  # [1, J]: 1 is the last token
  here = np.clip(n - back, 0, None)
  before = np.clip(n - back - spans[:, None], 0, None)
  repeated = (np.all((tail[here] == tail[before]) | (back > compared[:, None]), axis=1)
              & (spans * copies <= n))
  return int(np.argmax(repeated)) + 1 if repeated.any() else 0


def check_request(request: Request, config: GenerationConfig, decodes: bool) -> None:
  """ValueError for stop strings and settings the engine cannot act on (decodes: the engine can
  turn tokens into text, which stop strings need)."""
  if isinstance(request.stop, str) or not all(isinstance(s, str) and s for s in request.stop):
    raise ValueError(f"stop={request.stop!r}: expected a sequence of non-empty strings")
  if request.stop and not decodes:
    raise ValueError("a request with stop strings needs an engine that decodes text: "
                     "Engine(decode=...), as make_engine wires it")
  repeats = request.setting("loop_repeats", config)
  if repeats < 0 or repeats == 1:
    raise ValueError(f"loop_repeats={repeats}: 0 (off) or at least 2")
  repetition = request.setting("repetition_penalty", config)
  if repetition <= 0:
    raise ValueError(f"repetition_penalty={repetition}: must be positive")


def stop_reason(request: Request, config: GenerationConfig, out: RequestOutput,
                stream: Sequence[int], eos: int,
                decode: Callable[[Sequence[int]], str] | None) -> str:
  """Why a request ends after the output token it just took ("": it goes on), given its output
  and its output-stream tokens so far: EOS, then a stop string, then a loop, then
  max_new_tokens."""
  if stream[-1] == eos:
    return "eos"
  if request.stop and stop_found(decode, out.tokens, out.generated, request.stop):
    return "stop"
  repeats = request.setting("loop_repeats", config)
  if repeats and loop_span(stream, repeats, config.loop_max_span, config.loop_min_tokens):
    return "repetition"
  if len(stream) >= request.setting("max_new_tokens", config):
    return "max_new_tokens"
  return ""
