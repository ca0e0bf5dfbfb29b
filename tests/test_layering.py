"""Serving stays light: importing the server, the engine and the launchers that serve pulls in
neither the training data stack (TFDS, grain) nor the training loss module."""

import subprocess
import sys

from conftest import ROOT

HEAVY = ("tensorflow_datasets", "grain", "onegen_jax.losses", "onegen_jax.data.pipeline")


def test_serving_imports_neither_the_data_pipeline_nor_the_losses():
  code = ("import sys, onegen_jax.serving.app, onegen_jax.inference.run_dir, onegen_jax.inference.prior, "
          "launch.serve; "
          f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == "", f"imported: {out.stdout.strip()}"
