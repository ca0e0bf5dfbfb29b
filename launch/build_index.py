"""Encodes a db with a trained model and builds a retrieval index.

  python -m launch.build_index --workdir=RUN --db=DB.jsonl --backend=exact|scann|approx --out=DIR

DIR gets the index (onegen_jax.retrieval.index), vectors.npy (float32 [keys, D], the index's key
order) and documents.json (uid -> the text inserted on retrieval), which launch.infer reads.
Several processes (--distributed) encode together, each on its devices; process 0 writes DIR.
Mesh, dtype and process flags: launch/serving_flags.py. It also prints (stderr) whether the
index fits the devices as the KB of launch.infer's / launch.serve's --steps_per_dispatch > 1: its
bytes per device on this run's mesh against --device_kb_budget_mib.
"""

import json
import os
import sys

import jax
from absl import app, flags

from launch import serving_flags
from onegen_jax.inference.retrieval_policy import (BUDGET_HELP, device_kb_budget, task_footprint,
                                                   task_table)
from onegen_jax.inference.run_dir import encode_db, load_run
from onegen_jax.retrieval.index import ApproxIndex, ExactIndex, ScannIndex

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (training run or import).")
_DB = flags.DEFINE_string("db", None, "Reference-format db.jsonl.")
_BACKEND = flags.DEFINE_enum("backend", "exact", ["exact", "scann", "approx"], "Index backend.")
_OUT = flags.DEFINE_string("out", None, "Output directory.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
_SEQ_LEN = flags.DEFINE_integer("seq_len", None, "Row length for packed encoding; longer documents "
                                "are cut (their later keys dropped). Default: the run's training "
                                "max_len (data.max_len, else batch.seq_len), so the index holds the "
                                "keys training saw.")
_ENCODE_ROWS = flags.DEFINE_integer("encode_rows", None, "Rows of seq_len tokens per encoder "
                                    "batch, a multiple of mesh data x fsdp (default: twice it).")
_KB_BUDGET = flags.DEFINE_integer("device_kb_budget_mib", 0, BUDGET_HELP)
flags.mark_flags_as_required(["workdir", "db", "out"])

_BACKENDS = {"exact": ExactIndex, "scann": ScannIndex, "approx": ApproxIndex}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  run = load_run(_WORKDIR.value, _STEP.value, **serving_flags.start())
  vectors, uids, texts, report = encode_db(run, _DB.value, _OUT.value, rows=_ENCODE_ROWS.value,
                                           seq_len=_SEQ_LEN.value)
  if jax.process_index() != 0:  # process 0 holds every vector and writes the index
    return
  for warning in report.warnings:
    print(f"warning: {warning}", file=sys.stderr)
  footprint = task_footprint(run, len(uids), vectors.shape[1], task_table(run, uids, texts))
  print(f"retrieval: the {_BACKEND.value} index on the host (--steps_per_dispatch=1); for "
        f"--steps_per_dispatch > 1, the "
        f"{footprint.summary(device_kb_budget(run.mesh, _KB_BUDGET.value))}", file=sys.stderr)
  index = _BACKENDS[_BACKEND.value]().build(vectors, uids)
  index.save(_OUT.value)
  with open(os.path.join(_OUT.value, "documents.json"), "w") as f:
    json.dump(texts, f)
  counts = {k: report.counts.get(k, 0) for k in ("documents_truncated", "keys_lost_to_truncation")}
  print(json.dumps({"keys": len(uids), "documents": report.counts["documents"],
                    "documents_dropped": len(texts) - report.counts["documents"], **counts,
                    "dim": int(vectors.shape[1]), "backend": _BACKEND.value, "out": _OUT.value}))


if __name__ == "__main__":
  app.run(main)
