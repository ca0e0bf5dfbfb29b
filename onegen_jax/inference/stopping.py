"""The host-side stops the engine checks after each output token: a stop string in the decoded
tail of the output, and an n-gram loop (one span repeated to the end of the output stream)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

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


def loop_span(stream: Sequence[int], repeats: int, max_span: int) -> int:
  """The shortest span s (1 <= s <= max_span) of which `repeats` copies in a row end `stream`
  (output-stream token ids), or 0 when none does. Span s repeats when each of the stream's last
  s x (repeats - 1) tokens equals the token s before it: checked for every s at once on a
  [max_span, max_span x (repeats - 1)] grid."""
  tail = np.asarray(stream[-repeats * max_span:], np.int64)
  n = len(tail)
  if n < repeats:
    return 0
  spans = np.arange(1, max_span + 1)[:, None]  # [S, 1]
  back = np.arange(1, (repeats - 1) * max_span + 1)[None]  # [1, J]: 1 is the last token
  needed = back <= spans * (repeats - 1)
  here, before = np.clip(n - back, 0, None), np.clip(n - back - spans, 0, None)
  repeated = np.all((tail[here] == tail[before]) | ~needed, axis=1) & (spans[:, 0] * repeats <= n)
  return int(np.argmax(repeated)) + 1 if repeated.any() else 0
