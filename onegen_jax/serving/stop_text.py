"""Stop strings on the text side: an answer's text ends before the first of its stop strings
(`cut`): the one the text completes first as it grows, as the engine stops on it (of two ending
at the same character, the longer). A streamed answer never sends text past one (`StopStream`):
it holds back a tail that could still become one until more text settles it, so the streamed
pieces add up exactly to `cut` of the whole text, however the text was split."""

from __future__ import annotations

from collections.abc import Sequence


def first_stop(text: str, stops: Sequence[str]) -> int | None:
  """Where the first stop string in `text` starts: of the occurrences, the one ending first,
  then the one starting first (None: none occurs). Text added later cannot change it."""
  found = [(i + len(s), i) for s, i in ((s, text.find(s)) for s in stops) if i >= 0]
  return min(found)[1] if found else None


def cut(text: str, stops: Sequence[str]) -> tuple[str, bool]:
  """(the text before its first stop string, whether one occurs)."""
  at = first_stop(text, stops)
  return (text, False) if at is None else (text[:at], True)


def held_back(text: str, stops: Sequence[str]) -> int:
  """The length of the longest tail of `text` that is the start of a stop string but not all of
  it (text that more text could turn into a stop string)."""
  longest = 0
  for s in stops:
    for n in range(min(len(s) - 1, len(text)), longest, -1):
      if text.endswith(s[:n]):
        longest = n
        break
  return longest


class StopStream:
  """A text arriving in pieces, passed on without what lies past a stop string: `add` returns what
  may be sent now, `finish` the rest once the text is complete. The returned pieces add up to
  `cut(whole text, stops)[0]`."""

  def __init__(self, stops: Sequence[str]):
    self.stops = tuple(stops)
    self.text = ""
    self.sent = 0
    self.stopped = False

  def add(self, piece: str) -> str:
    if self.stopped:
      return ""
    self.text += piece
    at = first_stop(self.text, self.stops)
    self.stopped = at is not None
    # The boundary never moves back: a tail that could start a stop string after more text was
    # already such a tail before it (or a whole stop string, found then).
    end = at if self.stopped else len(self.text) - held_back(self.text, self.stops)
    out, self.sent = self.text[self.sent:end], end
    return out

  def finish(self) -> str:
    """What was held back: the text has ended, so a partial stop string is text after all."""
    if self.stopped:
      return ""
    out, self.sent = self.text[self.sent:], len(self.text)
    return out
