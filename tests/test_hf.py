"""Hugging Face interop: parity with transformers, export round trips, sharded import, vocab growth.

Tiny random transformers models (every weight perturbed, so a wrong mapping of any tensor shows)
are saved with `save_pretrained` and imported; the real SmolLM2 check is opt-in (-m real_model).
"""

import copy
import functools
import json
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from jax.sharding import PartitionSpec as P
from tokenizers import Tokenizer, models, pre_tokenizers

from conftest import ROOT
from launch.export_hf import export_hf
from onegen_jax import hf, sharding
from onegen_jax.checkpoint import Checkpointer, restore_lora, restore_merged, restore_target
from onegen_jax.inference.run_dir import load_run
from onegen_jax.model import lora
from onegen_jax.model.config import LoraConfig
from onegen_jax.model.decoder import Decoder, abstract_params

VOCAB, SEQ = 256, 16
_SIZES = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
_LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
HF_CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**_SIZES, rope_parameters={"rope_type": "default",
                                                                        "rope_theta": 5000.0}),
    "llama3_rope": lambda: transformers.LlamaConfig(**_SIZES, rope_parameters=_LLAMA3_ROPE),
    "qwen2_tied": lambda: transformers.Qwen2Config(**_SIZES, tie_word_embeddings=True),
    "mistral": lambda: transformers.MistralConfig(**_SIZES, head_dim=24, sliding_window=None),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """checkpoint(kind) -> (directory, torch model) of a tiny random model saved in float32."""
  @functools.cache
  def build(kind):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(HF_CONFIGS[kind](), dtype=torch.float32)
    with torch.no_grad():
      for param in model.parameters():  # norms away from 1, biases away from 0
        param.add_(0.05 * torch.randn_like(param))
    path = tmp_path_factory.mktemp(kind)
    model.eval().save_pretrained(path)
    return str(path), model
  return build


@functools.cache
def _apply(config):
  return jax.jit(Decoder(config).apply)


def _batch(seed=0):
  """tokens int32 [2, SEQ] and mask int32 [2, SEQ]; row 1 is right-padded after 11 tokens."""
  tokens = np.random.default_rng(seed).integers(0, VOCAB, (2, SEQ)).astype(np.int32)
  mask = np.ones((2, SEQ), np.int32)
  mask[1, 11:] = 0
  return tokens, mask


def _ours(config, params, tokens, mask):
  """(logits, hidden) of our Decoder as numpy; segment 1 = real tokens, 0 = padding."""
  positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
  logits, hidden = _apply(config)({"params": params}, tokens, mask, positions)
  return np.asarray(logits), np.asarray(hidden)


def _theirs(model, tokens, mask):
  with torch.no_grad():
    out = model(torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask),
                output_hidden_states=True)
  return out.logits.float().numpy(), out.hidden_states[-1].float().numpy()


def _import(checkpoint, kind, **overrides):
  path, model = checkpoint(kind)
  config = hf.config_from_hf(path, dtype="float32", **overrides)
  return path, model, config, hf.load_hf_params(path, config)


def _max_diff(a, b, mask):
  return np.abs(a[mask.astype(bool)] - b[mask.astype(bool)]).max()


@pytest.mark.parametrize("kind", sorted(HF_CONFIGS))
def test_import_matches_transformers(checkpoint, kind):
  _, model, config, params = _import(checkpoint, kind)
  tokens, mask = _batch()
  logits, hidden = _ours(config, params, tokens, mask)
  hf_logits, hf_hidden = _theirs(model, tokens, mask)
  assert _max_diff(logits, hf_logits, mask) < 1e-4
  assert _max_diff(hidden, hf_hidden, mask) < 1e-4


def test_hf_configs_map_to_model_configs_field_by_field():
  assert hf.config_from_hf(HF_CONFIGS["qwen2_tied"]().to_dict()).qkv_bias
  assert hf.config_from_hf(HF_CONFIGS["qwen2_tied"]().to_dict()).tie_embeddings
  assert hf.config_from_hf(HF_CONFIGS["mistral"]().to_dict()).dim_per_head == 24
  new_style = hf.config_from_hf(HF_CONFIGS["llama3_rope"]().to_dict())
  legacy_rope = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 64}  # transformers 4 wrote this form
  legacy = {"architectures": ["LlamaForCausalLM"], **_SIZES, "head_dim": 16, "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0, "rope_scaling": legacy_rope}
  assert hf.config_from_hf(legacy) == new_style
  assert new_style.rope_scaling.original_max_position_embeddings == 64


@pytest.mark.parametrize("hf_config, message", [
    ({"architectures": ["GPT2LMHeadModel"]}, "GPT2LMHeadModel"),
    ({"architectures": ["LlamaForCausalLM"], **_SIZES, "attention_bias": True}, "attention_bias"),
    ({"model_type": "llama", **_SIZES, "rope_parameters": {"rope_type": "yarn"}}, "yarn"),
])
def test_unsupported_configs_raise(hf_config, message):
  with pytest.raises(ValueError, match=message):
    hf.config_from_hf(hf_config)


def test_missing_misshapen_and_unexpected_tensors_raise(checkpoint):
  path, _ = checkpoint("llama")
  config = hf.config_from_hf(path)
  with pytest.raises(ValueError, match=r"model\.layers\.2\.input_layernorm\.weight.*missing"):
    hf.load_hf_params(path, config.replace(num_layers=3))
  with pytest.raises(ValueError, match=r"model\.embed_tokens\.weight in .*model\.safetensors"):
    hf.load_hf_params(path, config.replace(vocab_size=VOCAB + 8))
  qwen2_path, _ = checkpoint("qwen2_tied")
  with pytest.raises(ValueError, match=r"no place for.*model\.layers\.0\.self_attn\.k_proj\.bias"):
    hf.load_hf_params(qwen2_path, hf.config_from_hf(qwen2_path).replace(qkv_bias=False))


@pytest.mark.parametrize("kind, architecture", [
    ("llama", None), ("qwen2_tied", None), ("mistral", "MistralForCausalLM")])
def test_export_round_trip(checkpoint, kind, architecture, tmp_path):
  _, _, config, params = _import(checkpoint, kind)
  hf.save_hf_checkpoint(params, config, tmp_path, dtype="float32", architecture=architecture,
                        max_shard_bytes=60_000)
  with open(tmp_path / "model.safetensors.index.json") as f:
    assert len(set(json.load(f)["weight_map"].values())) > 1  # split into several files
  again = hf.load_hf_params(tmp_path, hf.config_from_hf(tmp_path, dtype="float32"))
  jax.tree.map(np.testing.assert_array_equal, again, params)

  model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
  default = "Qwen2ForCausalLM" if config.qkv_bias else "LlamaForCausalLM"
  assert type(model).__name__ == (architecture or default)
  tokens, mask = _batch(seed=1)
  logits, hidden = _ours(config, params, tokens, mask)
  hf_logits, hf_hidden = _theirs(model, tokens, mask)
  assert _max_diff(logits, hf_logits, mask) < 1e-4
  assert _max_diff(hidden, hf_hidden, mask) < 1e-4


def test_unscanned_layers_equal_the_scanned_stack_both_ways(checkpoint, tmp_path):
  path, _, config, scanned = _import(checkpoint, "qwen2_tied")
  unscanned = hf.load_hf_params(path, config.replace(scan_layers=False))
  for layer in range(config.num_layers):
    jax.tree.map(lambda stacked, one, i=layer: np.testing.assert_array_equal(stacked[i], one),
                 scanned["layers"], unscanned[f"layers_{layer}"])
  hf.save_hf_checkpoint(unscanned, config.replace(scan_layers=False), tmp_path, dtype="float32")
  jax.tree.map(np.testing.assert_array_equal, hf.load_hf_params(tmp_path, config), scanned)


def _tokenizer(size):
  vocab = {f"w{i}": i for i in range(size)}
  backend = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
  backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="w1",
                                              eos_token="w2", pad_token="w0")


def test_bfloat16_export_trims_padded_vocab_and_writes_tokenizer(checkpoint, tmp_path):
  _, _, config, params = _import(checkpoint, "llama")
  real_vocab = VOCAB - 6
  hf.save_hf_checkpoint(params, config, tmp_path, tokenizer=_tokenizer(real_vocab),
                        vocab_size=real_vocab)
  with open(tmp_path / "config.json") as f:
    written = json.load(f)
  assert (written["architectures"], written["vocab_size"]) == (["LlamaForCausalLM"], real_vocab)
  with open(tmp_path / "generation_config.json") as f:
    assert json.load(f)["eos_token_id"] == 2
  assert transformers.AutoTokenizer.from_pretrained(tmp_path)("w5 w7").input_ids == [5, 7]

  model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
  assert model.dtype == torch.bfloat16
  embed = model.model.embed_tokens.weight.detach().float().numpy()
  expected = params["embed_tokens"]["embedding"][:real_vocab].astype(jnp.bfloat16)
  np.testing.assert_array_equal(embed, expected.astype(np.float32))
  again = hf.load_hf_params(tmp_path, config.replace(vocab_size=real_vocab))
  expected = params["lm_head"]["kernel"][:, :real_vocab].astype(jnp.bfloat16).astype(jnp.float32)
  np.testing.assert_array_equal(again["lm_head"]["kernel"], expected)


_EXPECTED_SPECS = {  # leaf path -> mesh PartitionSpec under sharding.LOGICAL_RULES
    ("embed_tokens", "embedding"): P("tensor", "fsdp"),
    ("lm_head", "kernel"): P("fsdp", "tensor"),
    ("norm", "scale"): P(None),
    ("layers", "input_layernorm", "scale"): P(None, None),
    ("layers", "post_attention_layernorm", "scale"): P(None, None),
    ("layers", "self_attn", "q_proj", "kernel"): P(None, "fsdp", "tensor"),
    ("layers", "self_attn", "k_proj", "kernel"): P(None, "fsdp", "tensor"),
    ("layers", "self_attn", "v_proj", "kernel"): P(None, "fsdp", "tensor"),
    ("layers", "self_attn", "q_proj", "bias"): P(None, "tensor"),
    ("layers", "self_attn", "k_proj", "bias"): P(None, "tensor"),
    ("layers", "self_attn", "v_proj", "bias"): P(None, "tensor"),
    ("layers", "self_attn", "o_proj", "kernel"): P(None, "tensor", "fsdp"),
    ("layers", "mlp", "gate_proj", "kernel"): P(None, "fsdp", "tensor"),
    ("layers", "mlp", "up_proj", "kernel"): P(None, "fsdp", "tensor"),
    ("layers", "mlp", "down_proj", "kernel"): P(None, "tensor", "fsdp"),
}


def _paths(tree):
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [(tuple(k.key for k in path), leaf) for path, leaf in flat]


@pytest.mark.parametrize("kind", ["llama", "qwen2_tied"])
def test_sharded_import_places_every_tensor(checkpoint, kind):
  path, _, config, params = _import(checkpoint, kind)
  mesh = sharding.make_mesh(2, 2, 2)
  placed = hf.load_hf_params(path, config, mesh)
  for (name, array), (_, reference) in zip(_paths(placed), _paths(params)):
    assert array.sharding.mesh == mesh
    assert array.sharding.spec == _EXPECTED_SPECS[name], name
    np.testing.assert_array_equal(array, reference)

def test_sharded_params_export_and_grow(checkpoint, tmp_path):
  path, _, config, params = _import(checkpoint, "llama")
  placed = hf.load_hf_params(path, config, sharding.make_mesh(2, 2, 2))
  hf.save_hf_checkpoint(placed, config, tmp_path, dtype="float32")
  jax.tree.map(np.testing.assert_array_equal, hf.load_hf_params(tmp_path, config), params)
  grown, _ = hf.grow_vocab(placed, config, VOCAB + 1, {VOCAB: [3, 4]}, pad_to_multiple=8)
  for module, leaf in [("embed_tokens", "embedding"), ("lm_head", "kernel")]:
    assert grown[module][leaf].sharding == placed[module][leaf].sharding


@pytest.mark.parametrize("kind", ["llama", "qwen2_tied"])
def test_grow_vocab_keeps_old_logits(checkpoint, kind):
  _, _, config, params = _import(checkpoint, kind)
  init_rows = {VOCAB: [3, 4, 5], VOCAB + 1: [7], VOCAB + 2: [10, 11]}
  grown, grown_config = hf.grow_vocab(params, config, VOCAB + 3, init_rows, pad_to_multiple=8)
  assert grown_config.vocab_size == VOCAB + 8
  tokens, mask = _batch()
  logits, hidden = _ours(config, params, tokens, mask)
  new_logits, new_hidden = _ours(grown_config, grown, tokens, mask)
  np.testing.assert_array_equal(new_hidden, hidden)
  np.testing.assert_allclose(new_logits[..., :VOCAB], logits, atol=1e-6)

  tables = [("embed_tokens", "embedding", 0)]
  if not config.tie_embeddings:
    tables.append(("lm_head", "kernel", 1))
  for module, leaf, axis in tables:
    old = np.moveaxis(np.asarray(params[module][leaf]), axis, 0)
    new = np.moveaxis(np.asarray(grown[module][leaf]), axis, 0)
    for token, desc in init_rows.items():
      np.testing.assert_allclose(new[token], old[desc].mean(0), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(new[VOCAB + 3:], 0.0)


def test_grow_vocab_reinitialises_existing_unused_rows():
  config = hf.config_from_hf(HF_CONFIGS["llama"]().to_dict()).replace(vocab_size=6, hidden_size=2)
  embed = np.arange(12, dtype=np.float32).reshape(6, 2)
  params = {"embed_tokens": {"embedding": embed}, "lm_head": {"kernel": embed.T * 10}}
  grown, grown_config = hf.grow_vocab(params, config, 6, {5: [0, 2]})
  assert grown_config.vocab_size == 6
  np.testing.assert_array_equal(grown["embed_tokens"]["embedding"][5], [2.0, 3.0])
  np.testing.assert_array_equal(grown["lm_head"]["kernel"][:, 5], [20.0, 30.0])
  np.testing.assert_array_equal(grown["embed_tokens"]["embedding"][:5], embed[:5])
  with pytest.raises(ValueError, match="description of token 6"):
    hf.grow_vocab(params, config, 7, {6: [6]})


PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
           "Explain gravity to a child in two sentences."]
NEW_TOKENS = 20


def _greedy(config, params, prompts: list[list[int]], steps: int):
  """Greedy decoding by full forwards (no KV cache), all prompts in one right-padded batch.

  Returns (new tokens [B, steps], seconds spent after compilation).
  """
  model = Decoder(config)
  batch = len(prompts)
  seq_len = -(-(max(map(len, prompts)) + steps) // 16) * 16
  positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len))

  @jax.jit
  def next_tokens(params, tokens, segment_ids, lengths):
    hidden = model.apply({"params": params}, tokens, segment_ids, positions,
                         method=Decoder.hidden_states)
    last = hidden[jnp.arange(batch), lengths - 1][:, None]  # [B, 1, D]
    return jnp.argmax(model.apply({"params": params}, last, method=Decoder.logits)[:, 0], -1)

  tokens = np.zeros((batch, seq_len), np.int32)
  segment_ids = np.zeros((batch, seq_len), np.int32)
  for row, prompt in enumerate(prompts):
    tokens[row, :len(prompt)], segment_ids[row, :len(prompt)] = prompt, 1
  lengths = np.array([len(p) for p in prompts], np.int32)
  next_tokens(params, tokens, segment_ids, lengths).block_until_ready()  # compile
  start = time.perf_counter()
  for _ in range(steps):
    new = np.asarray(next_tokens(params, tokens, segment_ids, lengths))
    tokens[np.arange(batch), lengths], segment_ids[np.arange(batch), lengths] = new, 1
    lengths += 1
  seconds = time.perf_counter() - start
  return np.stack([tokens[row, len(p):len(p) + steps] for row, p in enumerate(prompts)]), seconds


@pytest.mark.real_model
def test_smollm2_greedy_decoding_matches_transformers(tmp_path):
  hf.convert_gguf(hf.smollm2_gguf_path(), tmp_path)
  tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
  chats = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                         add_generation_prompt=True) for p in PROMPTS]
  prompts = [tokenizer(chat, add_special_tokens=False).input_ids for chat in chats]
  config = hf.config_from_hf(tmp_path, dtype="float32", remat_policy="none")
  ours, our_seconds = _greedy(config, hf.load_hf_params(tmp_path, config), prompts, NEW_TOKENS)

  theirs, hf_seconds = [], 0.0
  hf_model.generate(torch.tensor(prompts[:1]), max_new_tokens=2, do_sample=False)  # warm-up
  for prompt in prompts:
    start = time.perf_counter()
    with torch.no_grad():
      out = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt)),
                              max_new_tokens=NEW_TOKENS, do_sample=False)
    hf_seconds += time.perf_counter() - start
    theirs.append(out[0, len(prompt):].tolist())
  print(f"\nours (full forward per token, batch {len(prompts)}): "
        f"{ours.size / our_seconds:.1f} tokens/s; transformers generate (KV cache, batch 1): "
        f"{sum(map(len, theirs)) / hf_seconds:.1f} tokens/s")
  matches = sum(ours[row, :len(t)].tolist() == t for row, t in enumerate(theirs))
  print(f"prompts whose tokens match: {matches}/{len(prompts)}")
  for row, hf_tokens in enumerate(theirs):
    print(repr(tokenizer.decode(hf_tokens)))
    # generate stops early only at EOS; our loop always runs NEW_TOKENS steps
    assert len(hf_tokens) == NEW_TOKENS or hf_tokens[-1] == tokenizer.eos_token_id
    assert ours[row, :len(hf_tokens)].tolist() == hf_tokens


@pytest.fixture(scope="module", params=["llama", "qwen2_tied"])
def lora_run(checkpoint, tmp_path_factory, request):
  """(base run, LoRA run, torch base model, LoRA model config): a tiny model (Llama; Qwen2 with
  q/k/v biases and tied embeddings) saved as launch.import_hf saves an import, and a LoRA run over
  it (all targets, token rows 3 and 5, the Llama's lm_head trained whole, a float32 base) whose
  trained leaves are random, saved as the fit loop saves one."""
  path, model, base_config, base = _import(checkpoint, request.param)
  root = tmp_path_factory.mktemp(f"lora-{request.param}")
  base_run, lora_run = str(root / "base"), str(root / "lora")
  ckpt = Checkpointer(base_run, async_save=False)
  architecture = type(model).__name__
  ckpt.save_params(0, base, {"hf": {"architecture": architecture, "vocab_size": VOCAB}},
                   base_config)
  ckpt.close()
  config = base_config.replace(lora=LoraConfig(
      rank=4, alpha=8.0, base_dtype="float32", token_ids=(3, 5),
      modules_to_save=() if base_config.tie_embeddings else ("lm_head",)))
  probe = jnp.zeros((1, 8), jnp.int32)
  fresh = nn.unbox(Decoder(config).init(jax.random.key(1), probe, probe, probe)["params"])
  trainable, _ = lora.split(lora.with_base(fresh, base), config.lora)
  noise = iter(jax.random.split(jax.random.key(2), 64))
  trainable = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(noise), x.shape), trainable)
  ckpt = Checkpointer(lora_run, async_save=False)
  ckpt.save_params(1, trainable, {"model": {"init_from": base_run},
                                  "lora": {"base": {"workdir": base_run, "step": 0}}}, config)
  ckpt.close()
  return base_run, lora_run, model, config


def _lora_forward(config, lora_run, tokens, mask):
  """Our LoRA model's (logits, hidden), adapters applied unmerged."""
  ckpt = Checkpointer(lora_run)
  mesh = sharding.make_mesh(data=-1)
  trainable, ref = restore_lora(ckpt, 1, config, mesh)
  ckpt.close()
  base = Checkpointer(ref["workdir"]).restore_params(
      ref["step"], restore_target(config.replace(lora=None), mesh))
  template = nn.unbox(abstract_params(config))
  _, frozen = lora.split(lora.with_base(template, base), config.lora)
  return _ours(config, lora.merge(trainable, frozen, config.lora), tokens, mask)


def test_lora_merged_export_equals_the_unmerged_model(lora_run, tmp_path):
  """export_hf --merge: our decoder on the merged params gives the unmerged LoRA model's logits
  to 1e-5, and transformers loading the export to 1e-4 (as any export; measured: 9.1e-7 and
  8.9e-7). Inference's load_run serves those merged params as a plain decoder."""
  _, run, _, config = lora_run
  tokens, mask = _batch(seed=2)
  want, _ = _lora_forward(config, run, tokens, mask)
  ckpt = Checkpointer(run)
  merged = restore_merged(ckpt, 1, config, sharding.make_mesh(data=-1))
  ckpt.close()
  plain = config.replace(lora=None)
  assert _max_diff(_ours(plain, merged, tokens, mask)[0], want, mask) < 1e-5
  export_hf(run, str(tmp_path), dtype="float32", lora="merge")
  model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
  assert _max_diff(_theirs(model, tokens, mask)[0], want, mask) < 1e-4
  with pytest.raises(ValueError, match="pass --merge or --adapter"):
    export_hf(run, str(tmp_path / "plain"))
  _tokenizer(VOCAB - 16).save_pretrained(f"{run}/tokenizer")  # inference: merged at load
  loaded = load_run(run, task="el", dtype="float32")
  assert loaded.model.config == plain
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded.params), jax.device_get(merged))


def test_lora_adapter_loads_in_peft_over_the_base(lora_run, tmp_path):
  """export_hf --adapter: peft.PeftModel.from_pretrained over the base's torch model (what the
  base run's export loads as) gives our LoRA model's logits to 1e-4 (measured: 8.9e-7; the base
  alone is > 0.1 away)."""
  _, run, base_model, config = lora_run
  export_hf(run, str(tmp_path), lora="adapter")
  tokens, mask = _batch(seed=3)
  want, _ = _lora_forward(config, run, tokens, mask)
  assert _max_diff(_theirs(base_model, tokens, mask)[0], want, mask) > 0.1  # adapters matter
  model = peft.PeftModel.from_pretrained(copy.deepcopy(base_model), str(tmp_path)).eval()
  assert _max_diff(_theirs(model, tokens, mask)[0], want, mask) < 1e-4


def test_a_peft_adapter_imports_as_a_lora_run(lora_run, tmp_path):
  """A LoRA made by peft itself (q and v, rank 2, token rows 4 and 9 of the input embedding and
  the head, random B and rows): launch.import_hf --adapter over the base run, then load_run
  (merged at load) gives the PeftModel's logits to 1e-4 (measured: 8.9e-7)."""
  base_run, _, base_model, _ = lora_run
  torch.manual_seed(1)
  model = peft.get_peft_model(copy.deepcopy(base_model), peft.LoraConfig(
      r=2, lora_alpha=6, target_modules=["q_proj", "v_proj"],
      trainable_token_indices={"embed_tokens": [4, 9], "lm_head": [4, 9]}))
  with torch.no_grad():
    for name, param in model.named_parameters():
      if "lora_B" in name or "trainable_tokens_delta" in name:
        param.add_(0.1 * torch.randn_like(param))
  model.save_pretrained(tmp_path / "adapter")
  _tokenizer(VOCAB - 16).save_pretrained(f"{base_run}/tokenizer")
  run = subprocess.run(
      [sys.executable, "-m", "launch.import_hf", f"--adapter={tmp_path / 'adapter'}",
       f"--base={base_run}", f"--workdir={tmp_path / 'run'}", "--base_dtype=float32"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  loaded = load_run(str(tmp_path / "run"), task="el", dtype="float32")
  tokens, mask = _batch(seed=4)
  want, _ = _theirs(model.eval(), tokens, mask)
  assert _max_diff(_theirs(base_model, tokens, mask)[0], want, mask) > 0.1  # adapters matter
  assert _max_diff(_ours(loaded.model.config, loaded.params, tokens, mask)[0], want, mask) < 1e-4


@pytest.mark.real_model
def test_smollm2_lora_adapter_loads_in_peft(tmp_path):
  """SmolLM2-135M (tied embeddings) with random rank-8 adapters on every projection and two
  trained token rows: peft over transformers' model gives our LoRA model's logits to 1e-4
  (measured: 7.9e-5 on logits up to 34; float32 over 30 layers)."""
  hf.convert_gguf(hf.smollm2_gguf_path(), tmp_path / "base")
  base_model = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path / "base", dtype=torch.float32).eval()
  plain = hf.config_from_hf(tmp_path / "base", dtype="float32", remat_policy="none")
  config = plain.replace(lora=LoraConfig(rank=8, alpha=16.0, base_dtype="float32",
                                         token_ids=(1, 2)))
  probe = jnp.zeros((1, 8), jnp.int32)
  fresh = nn.unbox(Decoder(config).init(jax.random.key(1), probe, probe, probe)["params"])
  trainable, frozen = lora.split(
      lora.with_base(fresh, hf.load_hf_params(tmp_path / "base", plain)), config.lora)
  noise = iter(jax.random.split(jax.random.key(2), 512))
  trainable = jax.tree.map(lambda x: x + 0.02 * jax.random.normal(next(noise), x.shape), trainable)
  hf.save_peft_adapter(trainable, config, tmp_path / "adapter")
  model = peft.PeftModel.from_pretrained(base_model, str(tmp_path / "adapter")).eval()
  tokens, mask = np.random.default_rng(0).integers(3, 1000, (2, 24)), np.ones((2, 24), np.int32)
  want, _ = _ours(config, lora.merge(trainable, frozen, config.lora), tokens, mask)
  assert _max_diff(_theirs(model, tokens, mask)[0], want, mask) < 1e-4
