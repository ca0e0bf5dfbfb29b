"""Hugging Face interop, one concern per module (every public name is re-exported here):

  config.py   config.json <-> ModelConfig: ARCHITECTURES, architecture, config_from_hf,
              to_hf_config
  weights.py  safetensors <-> Decoder parameters: load_hf_params (lazy, sharded),
              save_hf_checkpoint (shards + index, padded vocab trimmed)
  vocab.py    vocabulary growth for special tokens: grow_vocab, add_task_tokens (-> TaskTokens)
  gguf.py     GGUF -> HF directory: convert_gguf, smollm2_gguf_path
  peft.py     LoRA adapters <-> PEFT adapter directories: save_peft_adapter, read_lora_config,
              load_peft_adapter
"""

from onegen_jax.hf.config import ARCHITECTURES, architecture, config_from_hf, to_hf_config
from onegen_jax.hf.gguf import SMOLLM2_GGUF, convert_gguf, smollm2_gguf_path
from onegen_jax.hf.peft import load_peft_adapter, read_lora_config, save_peft_adapter
from onegen_jax.hf.vocab import TaskTokens, add_task_tokens, grow_vocab
from onegen_jax.hf.weights import load_hf_params, save_hf_checkpoint

__all__ = [
    "ARCHITECTURES", "SMOLLM2_GGUF", "TaskTokens", "add_task_tokens", "architecture",
    "config_from_hf", "convert_gguf", "grow_vocab", "load_hf_params", "load_peft_adapter",
    "read_lora_config", "save_hf_checkpoint", "save_peft_adapter", "smollm2_gguf_path",
    "to_hf_config",
]
