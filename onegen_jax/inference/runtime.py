"""From a run directory to answers: load the model, encode a db into an index, run requests.

Used by launch/build_index.py, launch/infer.py and benchmarks.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Sequence

import flax.linen as nn
import numpy as np
import tqdm

from onegen_jax import sharding
from onegen_jax.checkpoint import Checkpointer, model_config_from_json
from onegen_jax.data.encoding import TaskTokenizer
from onegen_jax.data.pipeline import max_len
from onegen_jax.data.prepare import Database, document_records
from onegen_jax.data.records import ROLES, Message, Report, load_documents, prompt_messages
from onegen_jax.data.tasks import Task, get_task
from onegen_jax.inference.engine import Engine, GenerationConfig, RequestOutput, TaskTokens
from onegen_jax.model.decoder import Decoder, abstract_params
from onegen_jax.retrieval.encode import EncodeItem, Encoder
from onegen_jax.retrieval.index import Index

_MENTION = re.compile(r"<MENTION>(.*?)</MENTION>")


@dataclasses.dataclass
class LoadedRun:
  model: Decoder
  params: dict
  mesh: object
  tokenizer: TaskTokenizer
  task: Task
  config: dict  # the run's saved config (JSON)


def load_run(workdir: str, step: int | None = None, task: str | None = None) -> LoadedRun:
  """The model, parameters (sharded over all devices) and tokenizer of a run directory.

  The tokenizer is WORKDIR/tokenizer when present (an import), else the run's data.tokenizer_path.
  """
  ckpt = Checkpointer(workdir)
  step = ckpt.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no complete checkpoint in {workdir}")
  model_config = model_config_from_json(ckpt.restore_json(step, "model"))
  config = ckpt.restore_json(step, "config")
  mesh = sharding.make_mesh(data=-1)
  abstract = abstract_params(model_config)
  target = sharding.with_shardings(nn.unbox(abstract), sharding.logical_to_sharding(
      nn.get_partition_spec(abstract), mesh))
  params = ckpt.restore_params(step, target)
  ckpt.close()
  name = task or config.get("data", {}).get("task") or config.get("task")
  if not name:
    raise ValueError(f"{workdir} names no task (an import without --config?): re-import with "
                     "--config=configs/TASK.py")
  task_obj = get_task(name)
  local = os.path.join(workdir, "tokenizer")
  tokenizer_dir = local if os.path.isdir(local) else config["data"]["tokenizer_path"]
  return LoadedRun(Decoder(model_config), params, mesh, TaskTokenizer(tokenizer_dir, task_obj),
                   task_obj, config)


def encode_db(run: LoadedRun, db_path: str, out_dir: str, chunk: int = 4096, rows: int = 8,
              seq_len: int | None = None) -> tuple[np.ndarray, list[str], dict[str, str], Report]:
  """Encodes every key of a db.jsonl, streaming vectors to OUT/vectors.npy chunk by chunk.

  seq_len: documents are cut to it (default: the run's training max_len, so inference has the
  keys training had). Returns (vectors float32 [keys, D] memory-mapped, key uids, document uid ->
  inserted text (records.Document.text), the report: documents truncated, keys lost, documents
  dropped).
  """
  seq_len = seq_len or max_len(run.config["data"], run.config["batch"]["seq_len"])
  docs, report = load_documents(run.task, db_path)
  records = document_records(docs, run.tokenizer, seq_len, report)
  database = Database(records)
  encoder = Encoder(run.model, run.mesh, rows=rows, seq_len=seq_len, max_reads=4 * rows)
  os.makedirs(out_dir, exist_ok=True)
  vectors = np.lib.format.open_memmap(os.path.join(out_dir, "vectors.npy"), mode="w+",
                                      dtype=np.float32,
                                      shape=(len(database.key_uids), run.model.config.hidden_size))
  items = [EncodeItem(d.tokens, tuple(k.position for k in d.keys))
           for d in database.corpus.documents.values()]
  done = 0
  for start in tqdm.tqdm(range(0, len(items), chunk), desc="encoding", unit="chunk"):
    block = encoder.encode(run.params, items[start:start + chunk])
    vectors[done:done + len(block)] = block
    done += len(block)
  vectors.flush()
  texts = {d.uid: d.text(run.task) for d in docs}
  return vectors, database.key_uids, texts, report


def make_engine(run: LoadedRun, index: Index, texts: dict[str, str], mode: str,
                config: GenerationConfig) -> Engine:
  """The OneGen engine over `index`: RAG inserts the retrieved key's whole document."""
  ids = run.tokenizer.ids
  task = run.task
  hf = run.tokenizer.hf
  eos = hf.eos_token_id
  if eos is None:
    raise ValueError("the tokenizer has no EOS token; generation could not stop")
  force = dict(task.force_after).get(task.query_token)

  # RAG retrieves documents (a paragraph's sentence keys map to it); EL retrieves entity keys.
  search = index.search_documents if mode == "rag" else index.search
  return Engine(
      run.model, run.params,
      TaskTokens(query=ids[task.query_token], eos=eos,
                 force_after_query=ids[force] if force else None),
      search, documents=lambda uid: run.tokenizer.insertion_tokens(texts[uid]),
      config=config, mode=mode, vocab_size=len(hf))


def read_requests(path: str) -> list[tuple[Message, ...]]:
  """The prompt of each line of a reference-format jsonl file: its messages before the last
  assistant message (records.prompt_messages; system messages included, as in training)."""
  requests, problems = [], []
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        messages = [Message(m["role"], m["content"]) for m in json.loads(line)["messages"]]
        bad = [m.role for m in messages if m.role not in ROLES or not isinstance(m.content, str)]
        if bad:
          raise ValueError(f"a message with role {bad[0]!r} or without string content")
        prompt = prompt_messages(messages)
        if not prompt:
          raise ValueError("no message before the assistant's (nothing to prompt with)")
        requests.append(prompt)
      except (ValueError, KeyError, TypeError) as e:
        problems.append(f"{path}:{number}: messages: {e}")
  if problems:
    raise ValueError("\n".join(problems))
  return requests


def prompt_tokens(run: LoadedRun, requests: list[tuple[Message, ...]],
                  max_len: int) -> list[list[int]]:
  """Token ids of each prompt, tokenised as training tokenises the same messages (each message on
  its own, no BOS/EOS): the first tokens of the training sequence of the same conversation."""
  encoded = run.tokenizer.encode(requests, run.task.query_token, max_len)
  return [e.tokens.tolist() for e in encoded]


def output_stream(tokenizer: TaskTokenizer, tokens: Sequence[int], prompt_len: int) -> list[int]:
  """What the model itself emits in a training sequence: its tokens after the prompt, without
  what the engine inserts (the CTX span right after a query RET token; the token forced after
  it). Forced through `Engine.generate(force=...)`, it replays a gold answer (teacher forcing)."""
  task, ids = tokenizer.task, tokenizer.ids
  force_after = dict(task.force_after).get(task.query_token)
  open_tag = ids[task.ctx_spans[0][0]] if task.ctx_spans else None
  out, i = [], prompt_len
  while i < len(tokens):
    out.append(tokens[i])
    if tokens[i] == ids[task.query_token] and i + 1 < len(tokens):
      if force_after:
        i += 1  # the forced token
      elif tokens[i + 1] == open_tag and ids[task.ctx_spans[0][1]] in tokens[i + 1:]:
        i = list(tokens).index(ids[task.ctx_spans[0][1]], i + 1)  # to the close tag
    i += 1
  return out


def linked_mentions(text: str, entities: list[str]) -> tuple[str, list[dict]]:
  """EL output `... <MENTION>m</MENTION>[LK][_CONTINUE_] ...` -> (plain text, mentions with
  character offsets in the plain text and the entity retrieved at each [LK], in order)."""
  plain, mentions, cursor = [], [], 0
  text = text.replace("[LK]", "").replace("[_CONTINUE_]", "")
  length = 0
  for i, match in enumerate(_MENTION.finditer(text)):
    before = text[cursor:match.start()]
    plain.append(before)
    length += len(before)
    surface = match.group(1)
    mentions.append({"start": length, "end": length + len(surface), "surface": surface,
                     "entity": entities[i] if i < len(entities) else None})
    plain.append(surface)
    length += len(surface)
    cursor = match.end()
  plain.append(text[cursor:])
  return "".join(plain), mentions


def output_record(run: LoadedRun, out: RequestOutput, mode: str) -> dict:
  """One JSON-ready result: text, retrievals per step, and for EL the linked mentions."""
  hf = run.tokenizer.hf
  tokens = [t for t in out.tokens if t != hf.eos_token_id]
  text = hf.decode(tokens, skip_special_tokens=False)
  record = {"text": text, "finished": out.finished, "stop_reason": out.stop_reason,
            "retrievals": [{"position": r.position, "ids": r.ids, "scores": r.scores}
                           for r in out.retrievals]}
  if mode == "el":
    record["plain_text"], record["mentions"] = linked_mentions(
        text, [r.ids[0] if r.ids else None for r in out.retrievals])
  return record
