"""The engine's compiled step: feed each row's tokens through the KV cache, then the next token
(greedy or sampled per row), the normalised hidden state, and the log-probabilities the engine
records (the next output token's, the watched tokens')."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from onegen_jax.model.ret_vectors import l2_normalize
from onegen_jax.model.decoder import Decoder


def _sample(logits: jnp.ndarray, keys: jax.Array, temperature: jnp.ndarray,
            top_p: jnp.ndarray) -> jnp.ndarray:
  """logits float32 [B, V], one rng key per row [B], each row's temperature and top_p float32 [B]
  -> token ids int32 [B] (greedy where temperature == 0; no nucleus cut where top_p >= 1)."""
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

  def sampled():
    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
    sorted_logits = jnp.sort(scaled, axis=-1)[:, ::-1]
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    # Keep the smallest prefix whose probability reaches top_p (always the top token).
    cutoff_index = jnp.minimum(jnp.sum(cumulative < top_p[:, None], axis=-1, keepdims=True),
                               logits.shape[-1] - 1)
    cutoff = jnp.take_along_axis(sorted_logits, cutoff_index, axis=-1)
    cutoff = jnp.where(top_p[:, None] < 1.0, cutoff, -jnp.inf)
    drawn = jax.vmap(jax.random.categorical)(keys, jnp.where(scaled < cutoff, -jnp.inf, scaled))
    return jnp.where(temperature > 0, drawn.astype(jnp.int32), greedy)

  return jax.lax.cond(jnp.any(temperature > 0), sampled, lambda: greedy)


def step_fn(model, vocab_size, seed, watch, params, tokens, cache_len, cache, last, counters,
             sampling, forced, window):
  """Feeds tokens [B, T] after each row's cache_len [B], attending to the first `window` cache
  entries. counters int32 [B, 2]: (request seed, its step) of each row, which key its sampling,
  so a request samples the same tokens whatever it is batched with; sampling float32 [B, 2]: each
  row's (temperature, top_p); forced int32 [B]: the token a row's next output is forced to (-1:
  none); watch: static token ids. Returns, at each row's `last` fed index: the next token [B]
  (sampled), the normalised hidden state [B, D], the log-probability of the row's next output
  token (forced or sampled) [B] and of each watched id [B, len(watch)]; and the new cache."""
  keys = jax.vmap(lambda c: jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), c[0]),
                                               c[1]))(counters)
  hidden, cache = model.apply({"params": params}, tokens, cache_len, cache, window,
                              method=Decoder.extend)
  final = hidden[jnp.arange(tokens.shape[0]), last]  # [B, D]
  logits = model.apply({"params": params}, final[:, None], method=Decoder.logits)[:, 0]
  logits = logits.astype(jnp.float32)
  if vocab_size is not None:
    logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_size, logits, -jnp.inf)
  sampled = _sample(logits, keys, sampling[:, 0], sampling[:, 1])
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  chosen = jnp.where(forced >= 0, forced, sampled)
  chosen_log_prob = jnp.take_along_axis(log_probs, chosen[:, None], axis=-1)[:, 0]
  watched = log_probs[:, jnp.asarray(watch, jnp.int32)] if watch else log_probs[:, :0]
  return sampled, l2_normalize(final), chosen_log_prob, watched, cache
