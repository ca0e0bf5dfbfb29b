"""End to end on generated data: train a few steps, encode the db, index it with each backend,
run one-pass RAG and entity-linking inference, score the outputs; and the three CLIs."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from configs import el, multihop
from onegen_jax.data.generate import make_dataset
from onegen_jax.eval.scoring import score_el, score_rag
from onegen_jax.inference.engine import GenerationConfig
from onegen_jax.inference.runtime import (encode_db, load_run, make_engine, output_record,
                                          prompt_tokens, read_requests)
from onegen_jax.retrieval.index import ApproxIndex, ExactIndex, ScannIndex
from onegen_jax.train.loop import fit

TASKS = {"el": (el, "el"), "multihop": (multihop, "rag")}


@pytest.fixture(scope="module", params=sorted(TASKS))
def trained(request, tmp_path_factory):
  """(task, mode, data dir, run dir) of the demo model trained 150 steps on generated data."""
  module, mode = TASKS[request.param]
  root = tmp_path_factory.mktemp(request.param)
  data = root / "data"
  make_dataset(request.param, str(data), seed=0, num_train=120, num_dev=6)
  config = module.get_config("demo")
  config.train.update(steps=150, eval_every=0, log_every=150)
  config.data.update(generate="", train_path=f"{data}/train.jsonl", db_path=f"{data}/db.jsonl",
                     dev_path=f"{data}/dev.jsonl", tokenizer_path=f"{data}/tokenizer")
  fit(config, str(root / "run"))
  return request.param, mode, data, root


def test_one_pass_inference_with_each_backend(trained):
  task, mode, data, root = trained
  run = load_run(str(root / "run"))
  vectors, uids, texts = encode_db(run, f"{data}/db.jsonl", str(root / "vectors"))
  assert vectors.shape == (len(uids), 64)
  np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
  requests = read_requests(f"{data}/dev.jsonl")
  prompts = prompt_tokens(run, requests, 512)
  config = GenerationConfig(max_new_tokens=48, batch_size=4, capacity=512, retrieve_k=3)
  results = {}
  for name, backend in (("exact", ExactIndex), ("scann", ScannIndex), ("approx", ApproxIndex)):
    index = backend().build(np.asarray(vectors), uids)
    outs = make_engine(run, index, texts, mode, config).generate(prompts)
    results[name] = [output_record(run, out, mode) for out in outs]
    for out in outs:
      for r in out.retrievals:
        assert len(r.ids) == 3 and r.scores == sorted(r.scores, reverse=True)
        assert set(r.ids) <= set(texts)  # documents (RAG) or entities (EL) of the db
        if mode == "rag":  # the retrieved paragraph follows the RET token in the same context
          inserted = run.tokenizer.hf.encode(texts[r.ids[0]], add_special_tokens=False)
          start = r.position - len(out.prompt) + 2  # after the RET token and <paragraph>
          assert out.tokens[start:start + len(inserted)] == inserted
  assert sum(len(o["retrievals"]) for o in results["exact"]) > 0, "no RET token was generated"
  # On CPU the approximate backend is exact, and ScaNN brute-forces a small db.
  assert [[r["ids"] for r in o["retrievals"]] for o in results["exact"]] == \
         [[r["ids"] for r in o["retrievals"]] for o in results["approx"]] == \
         [[r["ids"] for r in o["retrievals"]] for o in results["scann"]]
  gold = [json.loads(line) for line in open(f"{data}/dev.jsonl")]
  scores = (score_rag if mode == "rag" else score_el)(results["exact"], gold)
  assert all(0.0 <= v <= 1.0 for k, v in scores.items() if k not in ("questions", "documents"))


def test_command_line_chain(trained, tmp_path):
  task, mode, data, root = trained
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")

  def launch(module, *flags):
    with open(tmp_path / f"{module}.out", "w+") as out:
      proc = subprocess.run([sys.executable, "-m", f"launch.{module}", *flags], cwd=ROOT, env=env,
                            stdout=out, stderr=subprocess.PIPE, text=True, timeout=600)
      assert proc.returncode == 0, proc.stderr[-3000:]
      out.seek(0)
      return json.loads(out.read().strip().splitlines()[-1])

  built = launch("build_index", f"--workdir={root / 'run'}", f"--db={data}/db.jsonl",
                 "--backend=scann", f"--out={tmp_path / 'index'}")
  assert built["keys"] >= built["documents"] > 0
  ran = launch("infer", f"--workdir={root / 'run'}", f"--index={tmp_path / 'index'}",
               f"--task={mode}", f"--input={data}/dev.jsonl", f"--output={tmp_path / 'pred.jsonl'}",
               "--max_new_tokens=16")
  assert ran["requests"] == 6
  scores = launch("evaluate", f"--task={mode}", f"--predictions={tmp_path / 'pred.jsonl'}",
                  f"--gold={data}/dev.jsonl")
  assert ("em" in scores and "recall@1" in scores) if mode == "rag" else "strong_f1" in scores
