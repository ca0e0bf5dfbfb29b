"""Converts the public data of ../shared/data into the reference format (never committed).

  python -m launch.convert_data --task=el --src=../shared/data/el --out=/tmp/el_real
  python -m launch.convert_data --task=multihop --src=../shared/data/qa/hotpotqa_train100 \
      --out=/tmp/hotpotqa [--extra_corpus=../shared/data/qa/2wiki_corpus/corpus.jsonl]
  python -m launch.convert_data --task=selfrag --src=selfrag_train.jsonl --out=/tmp/selfrag
  python -m launch.convert_data --task=selfrag --src=../shared/data/qa/nq_open_oracle \
      --out=/tmp/selfrag_nq    # reflection tokens by stated rules (data/convert_selfrag.py)

Writes train.jsonl, dev.jsonl (every tenth example), db.jsonl and tokenizer/ (a byte-level BPE
trained on the converted text; point config.data.tokenizer_path at a model's own tokenizer instead
when fine-tuning a real checkpoint).
"""

from absl import app, flags

from onegen_jax.data.convert import convert_dataset

_TASK = flags.DEFINE_enum("task", None, ["el", "multihop", "selfrag"],
                          "Which task's data to convert.")
_SRC = flags.DEFINE_string("src", None, "el/ folder, or a qa/<set>/ folder with qa.jsonl, or "
                           "(selfrag) Self-RAG's training jsonl file.")
_OUT = flags.DEFINE_string("out", None, "Output directory.")
_VOCAB = flags.DEFINE_integer("vocab_size", 4096, "Vocabulary size of the trained BPE tokenizer.")
_EOS = flags.DEFINE_string("eos", "</s>", "End-of-sequence string appended to every answer.")
_EXTRA = flags.DEFINE_string("extra_corpus", None, "multihop: a corpus.jsonl of further documents.")
flags.mark_flags_as_required(["task", "src", "out"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  counts = convert_dataset(_TASK.value, _SRC.value, _OUT.value, _VOCAB.value, _EOS.value,
                           _EXTRA.value)
  print(f"wrote {_OUT.value}: {counts}")


if __name__ == "__main__":
  app.run(main)
