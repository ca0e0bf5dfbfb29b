"""Hugging Face safetensors <-> Decoder parameters: tensor names, lazy sharded import, export.

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
import json
import os

import flax.linen as nn
import jax
import ml_dtypes
import numpy as np
import safetensors.numpy
import transformers
from jax.sharding import Mesh

from onegen_jax import sharding
from onegen_jax.hf.config import to_hf_config
from onegen_jax.model.config import ModelConfig
from onegen_jax.model.decoder import abstract_params

# safetensors dtype names <-> numpy dtypes (bfloat16 through ml_dtypes, which jax ships with).
_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64}
_EXPORT_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
_VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")  # vocab on axis 0 in HF layout


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
  """The block `index` (a tuple of slices over our leaf's axes) of a leaf, read from HF tensors
  `names` (one per layer when `stacked`, the block then [layers, ...]; HF [out, in] weights
  transposed to [in, out] when `transpose`)."""
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
  """Reads a HF safetensors checkpoint into the Decoder's (unboxed) 'params' tree (embedding
  [V, D], Dense kernels [in, out], with scan_layers a leading [num_layers] axis on 'layers').

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
