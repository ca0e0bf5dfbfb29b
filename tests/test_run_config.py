"""What a run's config and data must agree on before training: steps derived from epochs, the key
budget's share of closed batches, the tokenizer's EOS at the end of every answer, input paths."""

import dataclasses
import math
import re
import subprocess
import sys

import numpy as np
import pytest
import transformers

from conftest import ROOT
from configs import el, multihop
from data_util import SHAPE, data_config, generated
from onegen_jax.checkpoint import Checkpointer
from onegen_jax.data.tokenized import Source, tokenize_source
from onegen_jax.data.packing import packing_efficiency
from onegen_jax.data.pipeline import build_data
from onegen_jax.data.records import ConfigError, DataError
from onegen_jax.data.tasks import EL
from onegen_jax.train import loop, program, run_length
from onegen_jax.train.data import make_train_data


def _paper_el_data(**data):
  """configs/el.py:llama2-7b (2 micro-batches of 64 rows, 40 queries each) on generated data."""
  config = el.get_config("llama2-7b")
  config.data.update(generate="", **data_config("el"), **data)
  return config, make_train_data(config, program.batch_shape(config))


def test_a_paper_variant_derives_its_steps_from_epochs_and_the_data():
  config, data = _paper_el_data()
  assert config.train.steps == 0 and config.train.epochs == 6
  position = data.get_state()
  steps, line = run_length.derive_steps(config, data, measured_steps=1)
  assert data.get_state() == position  # measuring did not advance the training batches
  next(data)  # the step that was measured
  per_step = sum(info["examples"] for info in data.last_step_info)  # both micro-batches
  # 40 queries per micro-batch (one anchor per el example) plus generation-only examples.
  assert 80 <= per_step < 96
  assert steps == math.ceil(6 * 96 / per_step)
  assert line == (f"train.steps = 6 epochs x 96 examples / {per_step:.1f} examples per step "
                  f"(measured over the first 1 steps) = {steps}")
  _, sharded = _paper_el_data(num_shards=2)  # two shards of 20 queries per micro-batch, summed
  assert 80 <= sharded.examples_per_step(1) < 96


def test_steps_and_epochs_both_zero_stop_the_run_at_once():
  config = el.get_config("demo")
  config.train.steps = 0
  with pytest.raises(ConfigError) as info:
    loop.fit(config)
  assert str(info.value) == "train.steps and train.epochs are both 0: set one of them"


def _closed(shape, steps=6):
  """(what closed each, mean packing efficiency) of the first `steps` multi-hop batches."""
  train, *_ = build_data(data_config("multihop", dev_path="", n_neg_per_pos=1), shape)
  out = [(packing_efficiency(next(train)), dict(train.last_batch_info)) for _ in range(steps)]
  assert all(info["examples"] >= 1 for _, info in out)
  return [info["limited_by"] for _, info in out], np.mean([e for e, _ in out])


def test_batches_say_whether_the_key_budget_closed_them():
  # Multi-hop documents have 2 keys each: 16 keys hold about 2 examples' documents, while 8 rows
  # of 256 tokens hold more; with 64 keys the rows fill first.
  tight, tight_efficiency = _closed(dataclasses.replace(SHAPE, num_keys=16))
  generous, generous_efficiency = _closed(SHAPE)
  assert set(tight) == {"keys"} and set(generous) == {"rows"}
  assert tight_efficiency < generous_efficiency - 0.1  # the key budget left rows empty


def test_the_fit_loop_logs_examples_per_step_and_warns_about_the_key_budget(capsys, tmp_path):
  config = multihop.get_config("demo")
  config.data.update(generate="", **data_config("multihop", dev_path=""))
  config.batch.update(num_keys=16, num_negatives=SHAPE.num_negatives)
  config.optim.update(schedule="linear", lr=1e-3)
  config.train.update(steps=0, epochs=0.05, log_every=1, eval_every=0)
  config.checkpoint.best_metric = ""  # no dev set
  _, final = loop.fit(config, str(tmp_path))
  out = capsys.readouterr().out
  derived = int(out.split("examples per step (measured over the first 8 steps) = ")[1].split()[0])
  assert final["step"] == derived and 2 <= derived <= 5  # 0.05 x 96 examples at 1-4 a step
  assert final["train_learning_rate"] == pytest.approx(1e-3 / derived)  # schedule over `derived`
  assert 1 <= final["train_examples_per_step"] <= 4
  assert out.count("warning: the key budget (batch.num_keys=16) closed") == 1
  assert "rows were left empty" in out
  assert " eval: " not in out and not any(k.startswith("eval_") for k in final)  # no dev set
  ckpt = Checkpointer(str(tmp_path))
  assert ckpt.restore_json(ckpt.latest_step(), "config")["train"]["steps"] == derived
  ckpt.close()
  _, resumed = loop.fit(config, str(tmp_path))  # the same derivation: the run is complete
  assert f"resumed from step {derived}" in capsys.readouterr().out
  assert resumed["step"] == derived


def _tokenizer_copy(tmp_path, **special):
  """The generated el tokenizer, saved again with `special` tokens changed."""
  tokenizer = transformers.AutoTokenizer.from_pretrained(f"{generated('el')}/tokenizer")
  for name, value in special.items():
    setattr(tokenizer, name, value)
  tokenizer.save_pretrained(tmp_path / "tokenizer")
  return str(tmp_path / "tokenizer")


def _source(tokenizer_path: str, max_len: int = 256) -> Source:
  d = generated("el")
  return Source(EL, f"{d}/train.jsonl", f"{d}/db.jsonl", tokenizer_path, max_len,
                dev_path=f"{d}/dev.jsonl")


def test_answers_must_end_with_the_tokenizers_eos(tmp_path):
  path = _tokenizer_copy(tmp_path, eos_token="<pad>")  # id 0; the data ends with </s> (id 1)
  with pytest.raises(DataError) as info:
    tokenize_source(_source(path))
  problems = info.value.problems
  assert len(problems) == 10 and str(info.value).startswith("96 problem(s) in the data:")
  assert str(info.value).endswith("\n... and 86 more like these")
  train = f"{generated('el')}/train.jsonl"
  assert problems[0].startswith(f"{train}:1: messages[1].content: ends with '")
  assert all("</s>' (ids [" in p and p.endswith(", 1]), not the tokenizer's EOS '<pad>' (id 0)")
             for p in problems)
  tokenize_source(_source(path, max_len=24))  # truncated answers lost their EOS legitimately


def test_a_tokenizer_without_eos_is_refused(tmp_path):
  path = _tokenizer_copy(tmp_path, eos_token=None)
  with pytest.raises(DataError, match=re.escape(f"{path}: eos_token: the tokenizer has no EOS")):
    tokenize_source(_source(path))


def test_a_missing_data_file_is_named_by_its_config_key(tmp_path):
  missing = str(tmp_path / "dev.jsonl")
  nowhere = str(tmp_path / "tokenizer")
  for key, value, problem in (("dev_path", missing, f"no such file: {missing}"),
                              ("tokenizer_path", nowhere, f"no such directory: {nowhere}"),
                              ("train_path", "", "not set")):
    with pytest.raises(ConfigError) as info:
      build_data(data_config("el", **{key: value}), SHAPE)
    assert str(info.value) == f"data.{key}: {problem}"
  with pytest.raises(ConfigError, match=r"^data\.document_text_weight: -1\.0 is negative"):
    build_data(data_config("el", document_text_weight=-1), SHAPE)
  d = generated("el")
  run = subprocess.run(
      [sys.executable, "-m", "launch.train", "--config=configs/el.py:demo",
       "--config.data.generate=", f"--config.data.train_path={d}/train.jsonl",
       f"--config.data.db_path={d}/db.jsonl", f"--config.data.tokenizer_path={d}/tokenizer",
       f"--config.data.dev_path={missing}"],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert run.returncode == 1
  assert run.stderr.strip().splitlines() == [f"data.dev_path: no such file: {missing}"]
