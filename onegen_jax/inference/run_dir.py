"""A run directory as something that serves: its model, parameters and tokenizer (`load_run`),
its db encoded into keys the way training encoded them (`encode_db`), and the OneGen engine wired
to an index (`make_engine`). Used by launch/build_index.py, launch/infer.py and benchmarks.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import numpy as np
import tqdm
from jax.sharding import Mesh

from onegen_jax import sharding
from onegen_jax.checkpoint import (Checkpointer, model_config_from_json, restore_merged,
                                   restore_target)
from onegen_jax.data.encoding import TaskTokenizer
from onegen_jax.data.tokenized import Database, document_records, max_len
from onegen_jax.data.reading import load_documents
from onegen_jax.data.records import Report
from onegen_jax.data.tasks import Task, get_task
from onegen_jax.inference.engine import Engine, GenerationConfig, TaskTokens
from onegen_jax.inference.requests import output_text
from onegen_jax.inference.retrieval_policy import task_retrieval
from onegen_jax.model.decoder import Decoder
from onegen_jax.retrieval.candidates import RankPrior
from onegen_jax.retrieval.encode import EncodeItem, Encoder
from onegen_jax.retrieval.index import Index, load_index


@dataclasses.dataclass
class LoadedRun:
  model: Decoder
  params: dict
  mesh: object
  tokenizer: TaskTokenizer
  task: Task
  config: dict  # the run's saved config (JSON)


def load_run(workdir: str, step: int | None = None, mesh: Mesh | None = None,
             task: str | None = None, dtype: str | None = None) -> LoadedRun:
  """The model, parameters and tokenizer of a run directory.

  mesh: a ('data', 'fsdp', 'tensor') mesh (sharding.make_mesh); the parameters are laid out on
  it by the training logical rules (vocab, heads, kv, mlp over 'tensor'; embed over 'fsdp').
  Default: a data-only mesh over all devices (every device holds all parameters).
  dtype: the compute dtype (activations, KV cache); default `compute_dtype`: bfloat16 on TPU and
  GPU, float32 on CPU. Parameters keep their stored dtype. A LoRA run is loaded merged
  into its base (checkpoint.restore_merged), as a plain Decoder in its param_dtype.
  The tokenizer is WORKDIR/tokenizer when present (an import), else the run's data.tokenizer_path.
  """
  ckpt = Checkpointer(workdir)
  step = ckpt.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no complete checkpoint in {workdir}")
  model_config = model_config_from_json(ckpt.restore_json(step, "model"))
  model_config = model_config.replace(dtype=dtype or compute_dtype())
  config = ckpt.restore_json(step, "config")
  mesh = sharding.make_mesh(data=-1) if mesh is None else mesh
  if model_config.lora is None:
    params = ckpt.restore_params(step, restore_target(model_config, mesh))
  else:  # merged into its base at load: a plain model, no per-step adapter cost
    params = restore_merged(ckpt, step, model_config, mesh)
    model_config = model_config.replace(lora=None)
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


def compute_dtype() -> str:
  """The inference compute dtype: bfloat16 on TPU and GPU, float32 on CPU, whatever the run
  trained in (XLA:CPU's bfloat16 dots at decode shapes are slow: SmolLM2-135M generates 5.7x the
  tokens/s in float32, benchmarks/RESULTS.md finding 16)."""
  return "bfloat16" if jax.default_backend() in ("tpu", "gpu") else "float32"


def document_encoder(run: LoadedRun, rows: int | None = None, seq_len: int | None = None
                     ) -> Encoder:
  """The encoder of db documents (build_index's keys): `rows` per batch, a multiple of the mesh's
  data x fsdp (default: twice it); documents cut to `seq_len` (default: the run's training
  max_len, so inference has the keys training had)."""
  seq_len = seq_len or max_len(run.config["data"], run.config["batch"]["seq_len"])
  rows = rows or 2 * run.mesh.shape["data"] * run.mesh.shape["fsdp"]
  return Encoder(run.model, run.mesh, rows=rows, seq_len=seq_len, max_reads=4 * rows)


def encode_db(run: LoadedRun, db_path: str, out_dir: str, chunk: int = 4096,
              rows: int | None = None, seq_len: int | None = None
              ) -> tuple[np.ndarray | None, list[str], dict[str, str], Report]:
  """Encodes every key of a db.jsonl, streaming vectors to OUT/vectors.npy chunk by chunk.

  rows, seq_len: `document_encoder`'s. Returns (vectors float32 [keys, D] memory-mapped, key uids, document uid ->
  inserted text (records.Document.text), the report: documents truncated, keys lost, documents
  dropped). Across processes every process encodes (one SPMD forward) and only process 0 writes
  OUT/vectors.npy; the others get vectors=None.
  """
  encoder = document_encoder(run, rows, seq_len)
  docs, report = load_documents(run.task, db_path)
  records = document_records(docs, run.tokenizer, encoder.seq_len, report)
  database = Database(records)
  writer = jax.process_index() == 0
  vectors = None
  if writer:
    os.makedirs(out_dir, exist_ok=True)
    vectors = np.lib.format.open_memmap(
        os.path.join(out_dir, "vectors.npy"), mode="w+", dtype=np.float32,
        shape=(len(database.key_uids), run.model.config.hidden_size))
  items = [EncodeItem(d.tokens, tuple(k.position for k in d.keys))
           for d in database.corpus.documents.values()]
  done = 0
  for start in tqdm.tqdm(range(0, len(items), chunk), desc="encoding", unit="chunk",
                         disable=not writer):
    block = encoder.encode(run.params, items[start:start + chunk])
    if writer:
      vectors[done:done + len(block)] = block
    done += len(block)
  if writer:
    vectors.flush()
  texts = {d.uid: d.text(run.task) for d in docs}
  return vectors, database.key_uids, texts, report


def load_index_dir(path: str) -> tuple[Index, dict[str, str], np.ndarray]:
  """What launch.build_index wrote to `path`: the index, document uid -> inserted text
  (documents.json), and the key vectors float32 [keys, D] in the index's order (memory-mapped;
  EL requests with candidates are scored against them)."""
  with open(os.path.join(path, "documents.json")) as f:
    texts = json.load(f)
  return load_index(path), texts, np.load(os.path.join(path, "vectors.npy"), mmap_mode="r")


def generation_config(task: Task, max_retrievals: int, **settings) -> GenerationConfig:
  """The engine settings of a task: RAG stops at `max_retrievals` queries; EL links every
  mention (no limit)."""
  return GenerationConfig(max_retrievals=max_retrievals if task.mode == "rag" else 1 << 30,
                          **settings)


def make_engine(run: LoadedRun, index: Index, texts: dict[str, str], config: GenerationConfig,
                vectors: np.ndarray | None = None, prior: RankPrior | None = None,
                **hooks) -> Engine:
  """The OneGen engine over `index`, retrieving as the run's task does
  (retrieval_policy.task_retrieval: RAG inserts the retrieved document; vectors and prior: EL
  requests with candidates); hooks: further Engine arguments (query_vectors). Stop strings are
  looked for in the text `output_text` gives an output (what launch.infer and the server
  return)."""
  ids = run.tokenizer.ids
  task = run.task
  hf = run.tokenizer.hf
  eos = hf.eos_token_id
  if eos is None:
    raise ValueError("the tokenizer has no EOS token; generation could not stop")
  force = dict(task.force_after).get(task.query_token)
  return Engine(
      run.model, run.params,
      TaskTokens(query=ids[task.query_token], eos=eos,
                 force_after_query=ids[force] if force else None),
      config=config, vocab_size=len(hf), mesh=run.mesh,
      decode=functools.partial(output_text, run.tokenizer),
      **task_retrieval(run, index, texts, vectors, prior), **hooks)
