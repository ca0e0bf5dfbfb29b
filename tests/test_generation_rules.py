"""The host's pure generation rules: the n-gram loop stop's span search, and launch.infer's
per-line settings (stop strings, penalties, loop_repeats) checked field by field."""

import json

import pytest

from onegen_jax.inference.requests import read_input
from onegen_jax.inference.stopping import loop_span


@pytest.mark.parametrize("stream, repeats, max_span, min_tokens, want", [
    ([5, 7, 7, 7], 3, 32, 0, 1),  # span 1, three times
    ([7, 7], 3, 32, 0, 0),  # two of three
    ([9, 1, 2, 3, 1, 2, 3, 1, 2, 3], 3, 32, 0, 3),  # span 3
    ([9, 1, 2, 3, 1, 2, 3], 3, 32, 0, 0),  # N - 1 repeats
    ([9, 1, 2, 3, 1, 2, 3], 2, 32, 0, 3),  # N repeats exactly
    ([1, 2, 3, 1, 2, 3, 1, 2, 3], 3, 2, 0, 0),  # longer than max_span
    ([1, 2, 3, 1, 2, 4, 1, 2, 3], 3, 32, 0, 0),  # not a loop
    ([4, 4, 4, 4, 4, 4], 3, 32, 0, 1),  # the shortest span
    ([2, 1, 2, 1, 2, 1, 2], 3, 32, 0, 2),
    ([], 2, 32, 0, 0),
    # the copies must cover min_tokens: a short span repeats ceil(min_tokens / span) times
    ([5, 0, 0, 0], 3, 32, 16, 0),  # the zeros of "2000" (an EL output the stop cut at N = 3)
    ([5] + [0] * 16, 3, 32, 16, 1),
    ([0] * 15, 3, 32, 16, 0),
    ([1, 2, 3] * 5, 3, 32, 16, 0),  # span 3 needs 6 copies
    ([9] + [1, 2, 3] * 6, 3, 32, 16, 3),
    (list(range(8)) * 3, 3, 32, 16, 8),  # a long span: `repeats` copies already cover 16
    (list(range(8)) * 2, 3, 32, 16, 0),
    ([], 3, 32, 16, 0),
])
def test_loop_span_finds_a_span_repeated_to_the_end(stream, repeats, max_span, min_tokens, want):
  assert loop_span(stream, repeats, max_span, min_tokens) == want


def test_input_lines_carry_stop_strings_and_penalties_checked_by_field(tmp_path):
  user = {"messages": [{"role": "user", "content": "Who?"}]}
  path = tmp_path / "in.jsonl"
  path.write_text("".join(json.dumps({**user, **s}) + "\n" for s in [
      {}, {"stop": "\n\n", "presence_penalty": 1, "frequency_penalty": -0.5},
      {"stop": ["a", "b"], "repetition_penalty": 1.2, "loop_repeats": 3}]))
  assert read_input(str(path)).settings == [
      {}, {"stop": ("\n\n",), "presence_penalty": 1.0, "frequency_penalty": -0.5},
      {"stop": ("a", "b"), "repetition_penalty": 1.2, "loop_repeats": 3}]
  path.write_text("".join(json.dumps({**user, **s}) + "\n" for s in [
      {"stop": ["a", ""]}, {"presence_penalty": "1"}, {"repetition_penalty": 0},
      {"loop_repeats": 1, "frequency_penalty": True}]))
  with pytest.raises(ValueError) as e:
    read_input(str(path))
  assert str(e.value).splitlines() == [
      f'{path}:1: stop: expected a non-empty string or a list of them, got ["a", ""]',
      f'{path}:2: presence_penalty: expected a number, got "1"',
      f"{path}:3: repetition_penalty: expected a positive number, got 0",
      f"{path}:4: frequency_penalty: expected a number, got true",
      f"{path}:4: loop_repeats: expected 0 (off) or an integer from 2, got 1"]
