"""Training metrics: model FLOPs, MFU, and writers (metrics.jsonl and TensorBoard event files).

TensorBoard files are written with tensorboardX, which needs no TensorFlow.
"""

from __future__ import annotations

import json
import os

import jax
import tqdm
from etils import epath
from tensorboardX import SummaryWriter

from onegen_jax.model.config import ModelConfig

# Dense bf16 peak FLOP/s per device, by substrings of `jax.Device.device_kind`.
PEAK_BF16_FLOPS = (
    ("v6", 918e12), ("v5p", 459e12), ("v5 lite", 197e12), ("v5e", 197e12), ("v4", 275e12),
    ("H200", 989e12), ("H100", 989e12), ("A100", 312e12),
)


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token: 6 x (non-embedding parameters + LM head) for the matmuls, plus
  causal attention counted at half of the full S x S (QK^T and AV, forward and backward)."""
  d, f, layers = config.hidden_size, config.intermediate_size, config.num_layers
  attn_width = config.num_heads * config.dim_per_head
  kv_width = config.num_kv_heads * config.dim_per_head
  per_layer = d * (attn_width + 2 * kv_width) + attn_width * d + 3 * d * f
  dense = layers * per_layer + d * config.vocab_size
  attention = 6 * layers * seq_len * attn_width  # 12 * L * S * width, halved for causality
  return 6.0 * dense + attention


def peak_flops_per_device() -> float | None:
  kind = jax.devices()[0].device_kind
  return next((peak for name, peak in PEAK_BF16_FLOPS if name.lower() in kind.lower()), None)


def say(message: str):
  """Progress for the user, from process 0 only (beside the progress bar)."""
  if jax.process_index() == 0:
    tqdm.tqdm.write(message)


class MetricsWriter:
  """Appends one JSON object per call to WORKDIR/metrics.jsonl and scalars to TensorBoard
  (WORKDIR/tensorboard); writes only on process 0. Without a workdir it writes nothing."""

  def __init__(self, workdir: str | None):
    self.enabled = workdir is not None and jax.process_index() == 0
    if self.enabled:
      epath.Path(workdir).mkdir(parents=True, exist_ok=True)
      self._jsonl = epath.Path(workdir) / "metrics.jsonl"
      self._tb = SummaryWriter(os.fspath(epath.Path(workdir) / "tensorboard"))

  def write(self, step: int, metrics: dict, prefix: str = "train"):
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in metrics.items()}
    with self._jsonl.open("a") as f:
      f.write(json.dumps({"step": step, "split": prefix, **scalars}) + "\n")
    for name, value in scalars.items():
      self._tb.add_scalar(f"{prefix}/{name}", value, step)
    self._tb.flush()

  def close(self):
    if self.enabled:
      self._tb.close()
