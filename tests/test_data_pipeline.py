"""The pipeline end to end: host sharding, checkpointable iterator, TFDS preparation, train step."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np

from conftest import demo_config
from data_util import SHAPE, data_config, generated
from onegen_jax.data.builder import prepare
from onegen_jax.data.loader import to_global
from onegen_jax.data.pipeline import build_data
from onegen_jax.data.tasks import MULTIHOP
from onegen_jax.data.tokenized import Source, tokenize_source

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWO_HOSTS = dataclasses.replace(SHAPE, rows=16, num_keys=128)  # 8 rows, 64 keys per host


def _stream(iterator, batches):
  """The example ids packed into the next `batches` batches, in order."""
  ids = []
  for _ in range(batches):
    next(iterator)
    ids += iterator.last_example_ids
  return ids


def _concat(local_batches):
  return {k: np.concatenate([b[k] for b in local_batches]) for k in local_batches[0]}


def test_two_hosts_cover_every_example_once_per_epoch():
  config = data_config("el")
  hosts = [build_data(config, TWO_HOSTS, seed=3, process_index=p, process_count=2) for p in (0, 1)]
  epochs = []
  for train, _, stats, *_ in hosts:
    ids = _stream(train, 80)
    shard = len(set(ids))  # this host's examples
    assert len(ids) > 2 * shard and len(set(ids[:shard])) == shard  # an epoch has no repeats
    assert set(ids[shard:2 * shard]) == set(ids[:shard]) and ids[shard:2 * shard] != ids[:shard]
    epochs.append(set(ids[:shard]))
  assert not epochs[0] & epochs[1]
  assert len(epochs[0] | epochs[1]) == stats["counts"]["examples"] == 96


def test_host_batches_concatenate_into_a_valid_global_batch():
  config = data_config("multihop")
  parts = [build_data(config, TWO_HOSTS, seed=0, process_index=p, process_count=2) for p in (0, 1)]
  batch = _concat([next(train) for train, *_ in parts])
  assert batch["tokens"].shape == (TWO_HOSTS.rows, TWO_HOSTS.seq_len)
  assert batch["query_index"].shape == (TWO_HOSTS.num_queries, 2)
  rq, rd = (parts[0][2]["special_ids"][t] for t in (MULTIHOP.query_token, MULTIHOP.doc_token))
  queries = batch["query_index"][batch["query_valid"]]
  keys = batch["key_index"][batch["key_valid"]]
  assert len(queries) and (batch["tokens"][queries[:, 0], queries[:, 1]] == rq).all()
  assert (batch["tokens"][keys[:, 0], keys[:, 1]] == rd).all()
  positives = batch["positive"][batch["query_valid"]]
  assert batch["key_valid"][positives].all()
  rows, keys = TWO_HOSTS.rows // 2, TWO_HOSTS.num_keys // 2
  assert {q[0] // rows for q in queries} == {0, 1}  # both hosts contribute queries
  for q, p in zip(queries, positives):  # each host's queries point at its own rows and keys
    assert q[0] // rows == batch["key_index"][p][0] // rows == p // keys
  assert len(parts[0][1]) == len(parts[1][1])  # hosts evaluate in step


def test_iterator_state_restores_the_same_batches():
  config = data_config("el")
  train, _, _, *_ = build_data(config, SHAPE, seed=1)
  for _ in range(5):
    next(train)
  state = json.loads(json.dumps(train.get_state()))
  expected = [next(train) for _ in range(4)]
  restored, _, _, *_ = build_data(config, SHAPE, seed=1)
  restored.set_state(state)
  for want in expected:
    got = next(restored)
    for name in want:
      np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_tfds_prepares_once_and_serves_the_in_memory_records(tmp_path):
  source = Source(MULTIHOP, *(f"{generated('multihop')}/{f}" for f in
                              ("train.jsonl", "db.jsonl", "tokenizer")), max_len=256,
                  dev_path=f"{generated('multihop')}/dev.jsonl")
  splits, metadata = prepare(source, str(tmp_path))
  memory, memory_metadata = tokenize_source(source)
  assert metadata["counts"] == memory_metadata["counts"] and metadata["prepare_s"] > 0
  for name in ("train", "dev", "db"):
    assert len(splits[name]) == len(memory[name])
    for i in (0, len(memory[name]) - 1):
      for field, value in memory[name][i].items():
        stored = splits[name][i][field]
        stored = stored.decode() if isinstance(stored, bytes) else stored
        np.testing.assert_array_equal(stored, value, err_msg=f"{name}[{i}].{field}")
  _, again = prepare(source, str(tmp_path))
  assert again["prepare_s"] == 0.0  # reused
  config = data_config("multihop", prepared_dir=str(tmp_path))
  from_tfds, _, _, *_ = build_data(config, SHAPE, seed=0)
  from_memory, _, _, *_ = build_data(data_config("multihop"), SHAPE, seed=0)
  for _ in range(3):
    a, b = next(from_tfds), next(from_memory)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_make_data_command_is_deterministic(tmp_path):
  for out in ("a", "b"):
    run = subprocess.run([sys.executable, "-m", "launch.make_data", "--task=multihop",
                          f"--out={tmp_path / out}", "--seed=4"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
  for name in ("train.jsonl", "dev.jsonl", "db.jsonl", "tokenizer/tokenizer.json"):
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_train_step_runs_on_pipeline_batches():
  config = demo_config(batch=dict(rows=SHAPE.rows, seq_len=SHAPE.seq_len,
                                  num_queries=SHAPE.num_queries, num_keys=SHAPE.num_keys,
                                  num_negatives=SHAPE.num_negatives),
                       mesh=dict(data=4, fsdp=2))
  from onegen_jax.train import program as program_lib, step

  program = program_lib.build_program(config)
  train, dev, stats, *_ = build_data(data_config("el"), SHAPE, seed=0)
  assert stats["vocab_size"] <= program.model.config.vocab_size
  shardings = step.batch_shardings(program.mesh, {k: v.ndim for k, v in dev[0].items()}, False)
  state = program.init_state(seed=0)
  for _ in range(2):
    batch = to_global(next(train), shardings)
    assert batch["tokens"].sharding == shardings["tokens"]
    state, metrics = program.step(state, batch)
    metrics = jax.device_get(metrics)
    assert np.isfinite(metrics["loss"]) and metrics["loss_ret"] > 0
  held_out = jax.device_get(program.evaluate(state.params, dev[0]))
  assert held_out["num_valid_queries"] > 0


def test_a_run_without_dev_set_builds_no_dev_data(tmp_path):
  for prepared in ("", str(tmp_path)):
    train, dev, stats, *_ = build_data(data_config("el", dev_path="", prepared_dir=prepared), SHAPE)
    assert dev == [] and "dev_examples" not in stats["counts"]
    assert next(train)["query_valid"].any()
