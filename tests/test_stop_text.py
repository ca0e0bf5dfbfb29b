"""Stop strings on the text side (serving/stop_text.py): the text ends before the first stop
string; a stream sends nothing past one, holds back what could become one, and its pieces add up
to the cut text."""

import hypothesis
from hypothesis import strategies as st

from onegen_jax.serving.stop_text import StopStream, cut, held_back


def stream(pieces, stops) -> list[str]:
  s = StopStream(stops)
  return [s.add(p) for p in pieces] + [s.finish()]


def test_the_text_ends_before_the_first_stop_string():
  assert cut("hello STOP world", ["STOP"]) == ("hello ", True)
  assert cut("a END b STOP", ["STOP", "END"]) == ("a ", True)  # the earliest, not the first given
  # Overlapping: the one the growing text completes first ("abc" before "bcd"), then, of two
  # ending together, the longer (the one starting first).
  assert cut("xabcd", ["bcd", "abc"]) == ("x", True)
  assert cut("aaacac", ["aca", "c"]) == ("aaa", True)  # "c" ends before "aca" does
  assert cut("xabc", ["bc", "abc"]) == ("x", True)
  assert cut("STOP", ["STOP"]) == ("", True)
  assert cut("no stop here", ["STOP"]) == ("no stop here", False)  # case matters
  assert cut("anything", []) == ("anything", False)


def test_a_tail_that_could_start_a_stop_string_is_held_back():
  assert held_back("hello ST", ["STOP"]) == 2
  assert held_back("hello", ["STOP"]) == 0
  assert held_back("xab", ["abc", "bx"]) == 2  # the longest over all stop strings
  assert held_back("S", ["STOP"]) == 1
  assert held_back("STOP", ["STOP"]) == 0  # a whole stop string is not a tail to hold


def test_a_stream_holds_back_then_releases_or_stops():
  # The stop string arrives in three pieces: nothing of it is ever sent.
  assert stream(["hel", "lo S", "TO", "P more"], ["STOP"]) == ["hel", "lo ", "", "", ""]
  # A false start: held back, then sent once the next piece rules the stop string out.
  assert stream(["hello S", "x"], ["STOP"]) == ["hello ", "Sx", ""]
  # The text ends inside a possible stop string: the held tail was text after all.
  assert stream(["abc ST"], ["STOP"]) == ["abc ", "ST"]
  # After a stop, later pieces are dropped even if they hold no stop string.
  assert stream(["aSTOPb", "cd"], ["STOP"]) == ["a", "", ""]
  assert stream(["a", "b"], []) == ["a", "b", ""]


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(text=st.text("abc", max_size=30),
                  stops=st.lists(st.text("abc", min_size=1, max_size=4), max_size=3),
                  cuts=st.lists(st.integers(0, 30), max_size=8))
def test_streamed_pieces_add_up_to_the_cut_text(text, stops, cuts):
  bounds = [0, *sorted(c for c in cuts if c <= len(text)), len(text)]
  pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
  sent = ""
  s = StopStream(stops)
  for piece in pieces:
    sent += s.add(piece)
    assert cut(sent, stops) == (sent, False)  # never a stop string in what was sent
    assert cut(text, stops)[0].startswith(sent)  # never past the cut
  assert sent + s.finish() == cut(text, stops)[0]
