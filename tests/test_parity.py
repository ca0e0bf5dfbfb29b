"""Train/inference parity: the engine feeds, token for token, what training fed.

For RAG and EL examples of the generated data, each with a system message, and three tokenizer
families (a SentencePiece Llama-2/Mistral-style `LlamaTokenizer` with Metaspace prepend "first",
a Llama-3/Qwen2-style byte-level BPE with a split regex, and the GPT-2-style byte-level BPE the
generated data ships, as SmolLM2 has), the example's gold answer is replayed through the real
engine (`Engine.generate(force=...)`, wired by `run.make_engine` as `launch.infer` wires it;
retrieval returns the example's positive) and
  - the engine's whole sequence (prompt, output stream, inserted paragraphs and forced tokens)
    equals the training tokenisation of the example, and
  - every query vector equals the training forward's hidden state at that RET token (float32).
The forced script is derived from the training tokens alone (`requests.output_stream` cuts the
insertions out by token id), so the insertions the engine makes are checked, not assumed.
"""

import dataclasses
import functools
import json
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_util import generated
from engine_util import ScriptedIndex
from onegen_jax.data.encoding import TaskTokenizer
from onegen_jax.data.dataset_dir import EOS, PAD, texts
from onegen_jax.data.loader import pack_all
from onegen_jax.data.packing import BatchShape
from onegen_jax.data.tokenized import Database, document_records, example_records, key_ids
from onegen_jax.data.reading import load_records
from onegen_jax.data.records import Message, canonical_key, prompt_messages
from onegen_jax.data.retrieval_sampling import Sampling
from onegen_jax.data.tasks import get_task
from onegen_jax.inference.engine import GenerationConfig
from onegen_jax.inference.requests import output_stream, prompt_tokens
from onegen_jax.inference.run_dir import LoadedRun, make_engine
from onegen_jax.model.config import preset
from onegen_jax.model.decoder import Decoder

TASKS = ("el", "multihop")
MAX_LEN = 512
SHAPE = BatchShape(rows=8, seq_len=MAX_LEN, num_queries=16, num_keys=64, num_negatives=6)
SYSTEM = Message("system", "You are a careful assistant.")
# The Llama-3 pre-tokenizer split (its tokenizer.json), also Qwen2's in spirit.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}"
                 r"\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _corpus(data_dir: str) -> list[str]:
  records = [[json.loads(line) for line in open(f"{data_dir}/{name}.jsonl")]
             for name in ("train", "dev", "db")]
  return texts(*records)


def _sentencepiece(corpus: list[str], out: str) -> str:
  """A Llama-2/Mistral-style tokenizer: transformers 5 `LlamaTokenizer` (Metaspace, prepend
  scheme "first") over a BPE trained here."""
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers
  from transformers import LlamaTokenizer

  bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
  bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
  bpe.train_from_iterator(corpus, trainers.BpeTrainer(
      vocab_size=600, special_tokens=["<unk>", "<s>", EOS], show_progress=False))
  model = json.loads(bpe.to_str())["model"]
  merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
  LlamaTokenizer(vocab=model["vocab"], merges=merges).save_pretrained(out)
  return out


def _byte_level_split(corpus: list[str], out: str) -> str:
  """A Llama-3/Qwen2-style tokenizer: the Llama-3 split regex, then byte-level BPE."""
  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast

  bpe = Tokenizer(models.BPE())
  bpe.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  bpe.decoder = decoders.ByteLevel()
  bpe.train_from_iterator(corpus, trainers.BpeTrainer(
      vocab_size=600, special_tokens=[PAD, EOS], show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token=PAD, eos_token=EOS).save_pretrained(out)
  return out


FAMILIES = {"sentencepiece": _sentencepiece, "byte_level_split": _byte_level_split,
            "gpt2": None}  # gpt2: the generated data's own tokenizer


@functools.lru_cache(maxsize=None)
def tokenizer_dir(family: str, task_name: str) -> str:
  data = generated(task_name)
  if FAMILIES[family] is None:
    return f"{data}/tokenizer"
  out = os.path.join(tempfile.mkdtemp(prefix=f"onegen-{family}-"), "tokenizer")
  return FAMILIES[family](_corpus(data), out)


@functools.lru_cache(maxsize=None)
def _model_and_params(vocab_size: int):
  model = Decoder(preset("tiny", vocab_size=vocab_size, dtype="float32"))
  tokens = jnp.ones((1, 8), jnp.int32)
  params = model.init(jax.random.key(0), tokens, tokens, jnp.arange(8)[None])["params"]
  hidden = jax.jit(lambda p, b: model.apply({"params": p}, b["tokens"], b["segment_ids"],
                                            b["positions"], method=Decoder.hidden_states))
  return model, jax.device_get(params), hidden


def _as_served(example, eos: str):
  """The example with a system message first and its final EOS string the tokenizer's."""
  *messages, last = example.messages
  assert last.role == "assistant" and last.content.endswith(EOS)
  last = Message("assistant", last.content[:-len(EOS)] + eos)
  return dataclasses.replace(example, messages=(SYSTEM, *messages, last))


def _setup(task_name: str, tokenizer_path: str, data_dir: str, num_examples: int, max_len: int):
  """(run, examples, their training records, db records, documents)."""
  task = get_task(task_name)
  tok = TaskTokenizer(tokenizer_path, task)
  train, _, docs, report = load_records(task, f"{data_dir}/train.jsonl", f"{data_dir}/db.jsonl")
  assert not report.counts.get("insertions_differing_from_db")
  examples = [_as_served(ex, tok.hf.eos_token) for ex in train[:num_examples]]
  db = document_records(docs, tok, max_len, report)
  records = example_records(examples, tok, key_ids(db), max_len, report)
  model, params, _ = _model_and_params(-(-len(tok.hf) // 64) * 64)
  return LoadedRun(model, params, None, tok, task, config={}), examples, records, db, docs


def _answers(example, docs, mode: str) -> list[str]:
  """What the scripted index returns at each query: the anchor's positive (its document for
  RAG; any entity where the mention has none)."""
  return [canonical_key(a.positives[0])[0] if mode == "rag" else a.positives[0]
          if a.positives else docs[0].uid for a in example.anchors]


def check_parity(task_name: str, tokenizer_path: str, data_dir: str, num_examples: int = 2,
                 max_len: int = MAX_LEN):
  run, examples, records, db, docs = _setup(task_name, tokenizer_path, data_dir, num_examples,
                                            max_len)
  task, tok, mode = run.task, run.tokenizer, run.task.mode
  _, _, training_hidden = _model_and_params(run.model.config.vocab_size)
  texts = {d.uid: d.text(task) for d in docs}
  config = GenerationConfig(max_new_tokens=max_len, max_retrievals=100, batch_size=1,
                            capacity=max_len)
  shape = dataclasses.replace(SHAPE, seq_len=max_len)
  for example, record in zip(examples, records):
    tokens = record["tokens"].tolist()
    assert tokens[-1] == tok.hf.eos_token_id  # not cut by max_len
    [prompt] = prompt_tokens(run, [prompt_messages(example.messages)], max_len)
    assert tokens[:len(prompt)] == prompt
    script = output_stream(tok, tokens, len(prompt))
    engine = make_engine(run, ScriptedIndex(_answers(example, docs, mode)), texts, config)
    [out] = engine.generate([prompt], force=[script])
    assert out.stop_reason == "eos"
    assert out.prompt + out.tokens == tokens  # token for token, CTX spans included
    rets = [i for i, t in enumerate(tokens) if t == tok.ids[task.query_token]
            and i >= len(prompt)]
    assert [r.position for r in out.retrievals] == rets
    # The training forward: the example packed into a training batch by the training path.
    [batch] = pack_all([record], Database(db), shape, Sampling(n_pos_per_sent=99, n_neg_per_pos=1))
    assert batch["segment_ids"][0, 0] == 1 and (batch["tokens"][0, :len(tokens)] == tokens).all()
    rows = {k: batch[k] for k in ("tokens", "segment_ids", "positions")}
    hidden = np.asarray(training_hidden(run.params, rows))
    vectors = {r.position: r.vector for r in out.retrievals}
    valid = batch["query_index"][batch["query_valid"]]
    assert len(valid) == len(record["positions"]) > 0
    for row, col in valid:
      want = hidden[row, col] / np.linalg.norm(hidden[row, col])
      np.testing.assert_allclose(vectors[int(col)], want, atol=1e-5)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("task_name", TASKS)
def test_engine_feeds_token_for_token_what_training_fed(task_name, family):
  check_parity(task_name, tokenizer_dir(family, task_name), generated(task_name))


def test_a_query_past_max_retrievals_ends_the_request():
  """The reference stops at the query after the last allowed retrieval: decoding past it would
  continue from a position training never saw."""
  run, examples, records, _, docs = _setup("multihop", tokenizer_dir("gpt2", "multihop"),
                                           generated("multihop"), 8, MAX_LEN)
  example, record = next((e, r) for e, r in zip(examples, records) if len(e.anchors) >= 2)
  tokens = record["tokens"].tolist()
  [prompt] = prompt_tokens(run, [prompt_messages(example.messages)], MAX_LEN)
  script = output_stream(run.tokenizer, tokens, len(prompt))
  config = GenerationConfig(max_new_tokens=MAX_LEN, max_retrievals=1, batch_size=1, capacity=MAX_LEN)
  texts = {d.uid: d.text(run.task) for d in docs}
  engine = make_engine(run, ScriptedIndex(_answers(example, docs, "rag")), texts, config)
  [out] = engine.generate([prompt], force=[script])
  query = run.tokenizer.ids[run.task.query_token]
  second = [i for i, t in enumerate(tokens) if t == query][1]
  assert out.stop_reason == "max_retrievals" and not out.finished and len(out.retrievals) == 1
  assert out.prompt + out.tokens == tokens[:second + 1]  # ends on the unanswered query


@pytest.mark.real_model
@pytest.mark.parametrize("task_name", TASKS)
def test_parity_with_the_smollm2_tokenizer(task_name, tmp_path):
  from onegen_jax import hf

  hf.convert_gguf(hf.smollm2_gguf_path(), tmp_path)
  check_parity(task_name, str(tmp_path), generated(task_name))


_SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))), "shared", "data")


@pytest.mark.shared_data
@pytest.mark.parametrize("task_name,folder", [
    ("el", "el"), ("multihop", "qa/hotpotqa_train100"), ("multihop", "qa/musique_train100"),
    ("multihop", "qa/nq_open_oracle")])
def test_parity_on_converted_shared_data(task_name, folder, tmp_path):
  from onegen_jax.data.convert import convert_dataset

  convert_dataset(task_name, os.path.join(_SHARED, folder), str(tmp_path))
  for family in ("sentencepiece", "gpt2"):
    path = (str(tmp_path / "tokenizer") if family == "gpt2" else
            _sentencepiece(_corpus(str(tmp_path)), str(tmp_path / family)))
    check_parity(task_name, path, str(tmp_path), num_examples=1, max_len=2048)
