"""launch.import_hf and launch.export_hf: round trips through transformers, the task's special
tokens, training from an import, and the retrieval-embedding snippet of docs/hf.md.

Tiny random transformers models (Llama untied, Qwen2 tied with spare vocab rows) share a byte-level
BPE tokenizer trained on the generated entity-linking data with the multihop task's tokens, so the
el task's tokens are new to it. The command lines run as subprocesses (output to files); export
also runs in-process (this module is the only one importing a launch module, whose absl flags
are global).
"""

import concurrent.futures
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from launch import export_hf
from onegen_jax.checkpoint import Checkpointer, read_model_config
from onegen_jax.data import dataset_dir, generate
from onegen_jax.data.encoding import TaskTokenizer
from onegen_jax.data.records import Message
from onegen_jax.data.tasks import EL, MULTIHOP
from onegen_jax.model.decoder import Decoder
from onegen_jax.retrieval.encode import EncodeItem, Encoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SIZES = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)
BASE_VOCAB = 512  # the tokenizer's size
HF_CONFIGS = {
    "llama": transformers.LlamaConfig(vocab_size=BASE_VOCAB, **_SIZES),
    "qwen2": transformers.Qwen2Config(vocab_size=BASE_VOCAB + 8, tie_word_embeddings=True, **_SIZES),
}


def _launch(log_dir, name: str, module: str, *flags) -> tuple[int, str, str]:
  """Runs `python -m module flags` on 8 CPU devices; (exit code, stdout, stderr)."""
  out, err = log_dir / f"{name}.out", log_dir / f"{name}.err"
  with open(out, "w") as stdout, open(err, "w") as stderr:
    code = subprocess.run([sys.executable, "-m", module, *map(str, flags)], cwd=ROOT,
                          stdout=stdout, stderr=stderr, timeout=300).returncode
  return code, out.read_text(), err.read_text()


def _run(log_dir, name: str, module: str, *flags) -> str:
  """Like `_launch`, asserting success; returns stdout."""
  code, out, err = _launch(log_dir, name, module, *flags)
  assert code == 0, f"{module} failed:\n{err[-3000:]}"
  return out


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """Directory with data/ (generated el data), tokenizer/, and one HF model dir per kind."""
  root = tmp_path_factory.mktemp("hf_launch")
  train, dev, db = generate.make_el(0, num_names=16, num_train=96, num_dev=16)
  dataset_dir.write_dataset(str(root / "data"), EL, train, dev, db)
  dataset_dir.train_tokenizer(dataset_dir.texts(train, dev, db), MULTIHOP, str(root / "tokenizer"),
                              BASE_VOCAB)
  torch.manual_seed(0)
  for kind, config in HF_CONFIGS.items():
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
      for param in model.parameters():  # norms away from 1, biases away from 0
        param.add_(0.05 * torch.randn_like(param))
    model.eval().save_pretrained(root / kind)
    shutil.copytree(root / "tokenizer", root / kind, dirs_exist_ok=True)
  return root


def _in_parallel(log_dir, *commands) -> list[tuple[int, str, str]]:
  """`_launch` of each (name, module, *flags), two at a time."""
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    return list(pool.map(lambda command: _launch(log_dir, *command), commands))


@pytest.fixture(scope="module")
def imports(base):
  """Both imports (side by side): the Qwen2 model without a config and the Llama model with
  configs/el.py; {kind: (run directory, stdout)}."""
  commands = {"qwen2": (), "llama": ("--config=configs/el.py",)}
  results = _in_parallel(base, *[(f"import_{kind}", "launch.import_hf", f"--hf_dir={base / kind}",
                                  f"--workdir={base / f'run_{kind}'}", *flags)
                                 for kind, flags in commands.items()])
  for code, _, err in results:
    assert code == 0, f"launch.import_hf failed:\n{err[-3000:]}"
  return {kind: (base / f"run_{kind}", out) for kind, (_, out, _) in zip(commands, results)}


@pytest.fixture(scope="module")
def el_import(base, imports):
  """RUN of the Llama model imported with configs/el.py, and its float32 export."""
  run, log = imports["llama"]
  assert "vocab 515 padded to 640" in log
  export_hf.export_hf(str(run), str(base / "out_el"), dtype="float32")
  return run, base / "out_el"


def _inputs(seed=0):
  """Ids of the base vocabulary [2, 16] and an attention mask (row 1 padded after 11)."""
  ids = torch.tensor(np.random.default_rng(seed).integers(0, BASE_VOCAB, (2, 16)))
  mask = torch.ones_like(ids)
  mask[1, 11:] = 0
  return ids, mask


def _logits(model_dir, ids, mask) -> np.ndarray:
  model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
  with torch.no_grad():
    logits = model(ids, attention_mask=mask).logits.numpy()
  return logits[mask.numpy().astype(bool)]


def _weights(model_dir) -> dict[str, np.ndarray]:
  return safetensors.numpy.load_file(os.path.join(model_dir, "model.safetensors"))


def test_import_export_round_trip_without_config(base, imports):
  run, out = imports["qwen2"][0], base / "out_qwen2"
  assert export_hf.export_hf(str(run), str(out), dtype="float32") == {
      "step": 0, "architecture": "Qwen2ForCausalLM", "vocab_size": BASE_VOCAB + 8}
  ids, mask = _inputs()
  diff = np.abs(_logits(out, ids, mask) - _logits(base / "qwen2", ids, mask)).max()
  print(f"\nround trip without config, max |logit diff| = {diff:.2e}")
  assert diff < 1e-4
  text = "Losa Loren is a festival in Pacre."
  original = transformers.AutoTokenizer.from_pretrained(base / "tokenizer")
  assert transformers.AutoTokenizer.from_pretrained(out)(text).input_ids == original(text).input_ids


def test_import_with_task_tokens(base, el_import):
  run, out = el_import
  ours = TaskTokenizer(str(base / "tokenizer"), EL)
  exported = transformers.AutoTokenizer.from_pretrained(out)
  assert ours.ids == {"[LK]": 512, "[SE]": 513, "[_CONTINUE_]": 514}
  assert {t: exported.convert_tokens_to_ids(t) for t in EL.special_tokens} == ours.ids
  assert TaskTokenizer(str(out), EL).ids == ours.ids
  assert read_model_config(str(run))[0].vocab_size == 640  # padded in the run
  assert transformers.AutoConfig.from_pretrained(out).vocab_size == len(exported) == 515

  ids, mask = _inputs()
  new, old = _logits(out, ids, mask), _logits(base / "llama", ids, mask)
  diff = np.abs(new[:, :BASE_VOCAB] - old).max()
  print(f"\nold logits on old inputs after adding the el tokens, max |diff| = {diff:.2e}")
  assert diff < 1e-5
  before, after = _weights(base / "llama"), _weights(out)
  for name in ("model.embed_tokens.weight", "lm_head.weight"):
    np.testing.assert_array_equal(after[name][:BASE_VOCAB], before[name])
    for token, description in ours.description_ids().items():
      np.testing.assert_allclose(after[name][token], before[name][description].mean(0),
                                 rtol=1e-6, atol=1e-7)


def test_training_starts_from_the_import(base, el_import, capsys):
  run, out = el_import
  train, data = base / "train", base / "data"
  _run(base, "train", "launch.train", "--config=configs/el.py:demo", f"--workdir={train}",
       f"--config.model.init_from={run}", "--config.train.steps=2", "--config.data.generate=",
       f"--config.data.train_path={data}/train.jsonl", f"--config.data.db_path={data}/db.jsonl",
       f"--config.data.dev_path={data}/dev.jsonl", f"--config.data.tokenizer_path={run}/tokenizer")
  assert read_model_config(str(train)) == (read_model_config(str(run))[0], 2)
  export_hf.export_hf(str(train), str(base / "out_train"), dtype="float32")
  assert "vocab 515 (of 640 rows)" in capsys.readouterr().out
  trained, imported = _weights(base / "out_train"), _weights(out)
  # Two warmup steps of Adam (lr <= 1.2e-4, updates about lr per element) from the import.
  changes = {name: np.abs(trained[name] - imported[name]).max() for name in imported}
  print(f"\nlargest change of a weight after 2 steps: {max(changes.values()):.2e}")
  assert 0 < max(changes.values()) < 1e-3
  exported = transformers.AutoTokenizer.from_pretrained(base / "out_train")
  assert exported.convert_tokens_to_ids("[LK]") == 512 and len(exported) == 515


def _snippet() -> str:
  """The Python block of the retrieval-embedding section of docs/hf.md."""
  with open(os.path.join(ROOT, "docs", "hf.md")) as f:
    section = f.read().split("## Reading the retrieval embedding", 1)[1]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_docs_snippet_matches_the_encoder(base, el_import):
  run, out = el_import
  namespace = {}
  exec(_snippet().replace('"exported"', repr(str(out))), namespace)  # noqa: S102
  user = EL.doc_instruction.format(title="Losa Loren")
  body = "Losa Loren is a festival in Pacre, first recorded in 1878.[SE]"
  theirs = namespace["embed"]([user, body]).numpy()

  tokenizer = TaskTokenizer(str(run / "tokenizer"), EL)
  encoded = tokenizer.tokenize_with_roles([[Message("user", user), Message("assistant", body)]], "[SE]", 256)[0]
  assert encoded.rets.tolist() == [len(encoded.tokens) - 1]
  config, _ = read_model_config(str(run))
  params = Checkpointer(str(run)).restore_params(0)
  mesh = jax.tree.leaves(params)[0].sharding.mesh
  encoder = Encoder(Decoder(config.replace(dtype="float32")), mesh, rows=8, seq_len=128)
  ours = encoder.encode(params, [EncodeItem(encoded.tokens, tuple(encoded.rets))])[0]
  diff = np.abs(ours - theirs).max()
  print(f"\ndocs snippet vs Encoder, max |diff| = {diff:.2e}")
  assert diff < 1e-4


def test_errors_are_clear(base, tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    export_hf.export_hf(str(tmp_path / "missing"), str(tmp_path / "out"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
    export_hf.export_hf(str(tmp_path / "empty"), str(tmp_path / "out"))
  gpt2 = tmp_path / "gpt2"
  gpt2.mkdir()
  (gpt2 / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
  missing, unknown = _in_parallel(
      tmp_path, ("import_missing", "launch.import_hf", f"--hf_dir={tmp_path / 'missing'}",
                 f"--workdir={tmp_path / 'run'}"),
      ("import_gpt2", "launch.import_hf", f"--hf_dir={gpt2}", f"--workdir={tmp_path / 'run'}"))
  assert missing[0] == 1 and "config.json not found: --hf_dir must be" in missing[2]
  assert unknown[0] == 1 and "import_hf: unsupported architecture 'GPT2LMHeadModel'" in unknown[2]
  assert not (tmp_path / "run").exists()  # nothing written before the checks
