"""The reader's errors: each fault of tests/data/malformed names its file, line and field."""

import json
import os
import subprocess
import sys

import pytest

from data_util import generated
from onegen_jax.data.reading import load_records
from onegen_jax.data.records import DataError
from onegen_jax.data.tasks import MULTIHOP

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MALFORMED = os.path.join(ROOT, "tests", "data", "malformed")
TRAIN, DB, SOME_BAD = (os.path.join(MALFORMED, f) for f in ("train.jsonl", "db.jsonl", "some_bad.jsonl"))
GOOD_DB = "d1 and d2 are documents of db.jsonl"

TRAIN_FAULTS = {
    2: ("json", "invalid JSON"),
    3: ("json", "expected an object, got list"),
    4: ("messages", "missing"),
    5: ("messages", "expected a non-empty list"),
    6: ("messages[0].role", "unknown role 'bot'"),
    7: ("messages[0].content", "expected a string, got int"),
    8: ("messages[1].positive", "1 entries for 2 [Question Representation] tokens"),
    9: ("messages[1].negative", "2 entries for 1 [Question Representation] tokens"),
    10: ("messages[1].positive[0]", "expected a uid, a list of uids or null, got 42"),
    11: ("messages[1].positive[0]", "bad uid 'd1-x'"),
    12: ("messages[1].negative[0]", "expected a list of uids, got \"d2\""),
    13: ("messages[1].positive", "missing (the content has 1 [Question Representation] tokens)"),
    14: ("messages", "no assistant message"),
    15: ("messages[1].content", "unclosed <paragraph>"),
    16: ("messages[1].content", "</paragraph> without <paragraph>"),
    17: ("messages[1].content", "a [Question Representation] token inside a <paragraph> span"),
    18: ("messages[0]", "expected an object, got str"),
    19: ("messages[1].positive", "expected a list, got str"),
}
DB_FAULTS = {
    2: ("uid", "missing"),
    3: ("uid", "bad uid 'd-3'"),
    4: ("uid", "expected a string, got int"),
    5: ("uid", "duplicate uid 'd1' (first on line 1)"),
    6: ("messages", "empty document"),
    7: ("messages", "no [Document Fragment Representation] token in an assistant message"),
    9: ("json", "invalid JSON"),
}


def test_every_fault_is_reported_with_file_line_and_field():
  with pytest.raises(DataError) as info:
    load_records(MULTIHOP, TRAIN, DB)
  problems = info.value.problems
  for path, faults in ((TRAIN, TRAIN_FAULTS), (DB, DB_FAULTS)):
    for line, (field, problem) in faults.items():
      prefix = f"{path}:{line}: {field}: "
      hits = [p for p in problems if p.startswith(prefix)]
      assert any(problem in p for p in hits), (prefix + problem, hits)
  lines = {p.split(": ")[0] for p in problems}
  assert lines == ({f"{TRAIN}:{n}" for n in TRAIN_FAULTS} | {f"{DB}:{n}" for n in DB_FAULTS})
  assert str(info.value).count("\n") == len(problems)  # the message lists every problem


def test_max_bad_lines_skips_bad_lines_and_loads_the_rest(tmp_path):
  db = tmp_path / "db.jsonl"
  with open(DB) as f:
    db.write_text("".join(line for n, line in enumerate(f, 1) if n in (1, 8)))
  with pytest.raises(DataError) as info:
    load_records(MULTIHOP, SOME_BAD, str(db), max_bad_lines=1)
  assert [p.split(": ")[0] for p in info.value.problems] == [f"{SOME_BAD}:2", f"{SOME_BAD}:5"]
  train, dev, docs, report = load_records(MULTIHOP, SOME_BAD, str(db), max_bad_lines=2)
  assert [e.line for e in train] == [1, 3, 4, 6] and not dev
  assert [d.uid for d in docs] == ["d1", "d2"]
  assert report.counts["skipped_lines"] == 2 and len(report.skipped) == 2
  # Line 4's positive 'zz' is not in the db: the reference silently makes the anchor
  # generation-only; here it is counted and reported.
  assert report.counts["positives_missing_from_db"] == 1
  assert report.counts["anchors_without_db_positive"] == 1
  # Lines 1, 3 and 6 train on `<paragraph>t</paragraph>` after a query whose positive d1 reads
  # "text": inference would insert another context than training saw.
  inserted = ("messages[1].positive[0]: the <paragraph> span after this query is not the text "
              "inference inserts for d1 (its db assistant content without "
              "[Document Fragment Representation])")
  assert report.warnings == [f"{SOME_BAD}:4: messages[1].positive[0]: 'zz' not in the db; "
                             "the anchor is generation-only"] + [
                                 f"{SOME_BAD}:{n}: {inserted}" for n in (1, 3, 6)]
  assert report.counts["insertions_differing_from_db"] == 3
  assert train[2].anchors[0].positives == ()


def test_prepare_command_exits_non_zero_listing_every_bad_line(tmp_path):
  data = tmp_path / "data"
  data.mkdir()
  for name, src in (("train.jsonl", TRAIN), ("db.jsonl", DB)):
    (data / name).write_text(open(src).read())
  (data / "tokenizer").symlink_to(os.path.join(generated("multihop"), "tokenizer"))
  run = subprocess.run([sys.executable, "-m", "launch.prepare_data", "--task=multihop",
                        f"--data={data}", f"--prepared_dir={tmp_path / 'tfds'}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert run.returncode != 0
  for n in TRAIN_FAULTS:
    assert f"{data / 'train.jsonl'}:{n}: " in run.stderr
  for n in DB_FAULTS:
    assert f"{data / 'db.jsonl'}:{n}: " in run.stderr


def test_inference_input_is_read_once_naming_every_bad_line_and_field(tmp_path):
  from onegen_jax.inference.requests import read_input
  user = {"role": "user", "content": "Who?"}
  lines = [{"messages": [user, {"role": "assistant", "content": "x"}], "candidates": ["a", "b"]},
           {"messages": [user], "candidates": [["a"], ["b", "c"]], "answer_prefix": "It"},
           {"messages": [user]}]
  path = tmp_path / "in.jsonl"
  path.write_text("".join(json.dumps(line) + "\n\n" for line in lines))
  inputs = read_input(str(path))
  assert [[m.content for m in p] for p in inputs.prompts] == [["Who?"]] * 3
  assert inputs.candidates == [["a", "b"], [["a"], ["b", "c"]], None]
  assert inputs.prefixes == [None, "It", None] and inputs.numbers == [1, 3, 5]

  bad = [{"messages": [{"role": "assistant", "content": "x"}]},
         {"messages": [user], "candidates": "a"},
         "{not json", "[1, 2]", {"messages": [user], "answer_prefix": ["It"]}]
  path.write_text("".join((b if isinstance(b, str) else json.dumps(b)) + "\n" for b in bad))
  with pytest.raises(ValueError) as e:
    read_input(str(path))
  assert str(e.value).splitlines() == [
      f"{path}:1: messages: no message before the assistant's (nothing to prompt with)",
      f'{path}:2: candidates: expected a list of uids or a list of such lists, got "a"',
      f"{path}:3: not JSON: Expecting property name enclosed in double quotes: line 1 column 2 "
      f"(char 1)",
      f"{path}:4: not a JSON object: [1, 2]",
      f'{path}:5: answer_prefix: expected a string, got ["It"]']
