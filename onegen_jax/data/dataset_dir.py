"""A dataset directory as the launchers read it: train.jsonl, dev.jsonl, db.jsonl and tokenizer/ (a
byte-level BPE trained on their text). The demo generator and the converters of public data both
write one here."""

from __future__ import annotations

import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from onegen_jax.data.records import write_jsonl
from onegen_jax.data.tasks import Task

EOS, PAD = "</s>", "<pad>"


def texts(*files: list[dict]) -> list[str]:
  """Every message content of the given records."""
  return [m["content"] for records in files for r in records for m in r["messages"]]


def train_tokenizer(corpus: list[str], task: Task, out_dir: str, vocab_size: int = 512):
  """A byte-level BPE trained on `corpus`, saved as a Hugging Face fast tokenizer directory.

  Id 0 is <pad> (the packer pads with 0), then the EOS </s> and the task's special tokens.
  """
  tokenizer = Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  specials = [PAD, EOS, *task.special_tokens]
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tokenizer.train_from_iterator(corpus, trainer)
  fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=PAD, eos_token=EOS,
                                 additional_special_tokens=list(task.special_tokens))
  fast.save_pretrained(out_dir)


def write_dataset(out_dir: str, task: Task, train: list[dict], dev: list[dict], db: list[dict],
                  vocab_size: int = 512):
  """Writes train.jsonl, dev.jsonl, db.jsonl and tokenizer/ (BPE trained on all their text)."""
  os.makedirs(out_dir, exist_ok=True)
  for name, records in (("train", train), ("dev", dev), ("db", db)):
    write_jsonl(os.path.join(out_dir, f"{name}.jsonl"), records)
  train_tokenizer(texts(train, dev, db), task, os.path.join(out_dir, "tokenizer"), vocab_size)
