"""The engine's compiled step: feed each row's tokens through the KV cache, then the next token
(greedy or sampled per row, after its penalties), the normalised hidden state, and the
log-probabilities the engine records (the next output token's, the watched tokens': the model's,
unpenalised)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from onegen_jax.model.ret_vectors import l2_normalize
from onegen_jax.model.decoder import Decoder


def penalise(logits: jnp.ndarray, penalties: jnp.ndarray, history: jnp.ndarray,
             output_from: jnp.ndarray) -> jnp.ndarray:
  """logits float32 [B, V] after each row's penalties float32 [B, 3] (presence, frequency,
  repetition) over its history int32 [B, H] of token ids (-1: padding), whose entries from
  output_from int32 [B] on are its output stream and the ones before its prompt. As vLLM: first
  the repetition penalty (HF's, CTRL's) over every token in the history, a logit l becoming l / p
  if l > 0 else l * p; then minus frequency x count + presence over the output stream's tokens.
  A token a row's history lacks keeps its logit bit for bit."""
  rows, vocab = logits.shape
  index = (jnp.arange(rows)[:, None], jnp.where(history >= 0, history, vocab))  # vocab: dropped
  is_output = jnp.arange(history.shape[1])[None] >= output_from[:, None]
  seen = jnp.zeros(logits.shape, bool).at[index].set(True, mode="drop")
  counts = jnp.zeros(logits.shape, jnp.float32).at[index].add(
      is_output.astype(jnp.float32), mode="drop")
  presence, frequency, repetition = (penalties[:, i, None] for i in range(3))
  logits = jnp.where(seen, jnp.where(logits > 0, logits / repetition, logits * repetition), logits)
  return jnp.where(counts > 0, logits - (frequency * counts + presence), logits)


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


def row_keys(seed: int, counters: jnp.ndarray) -> jax.Array:
  """counters int32 [B, 2]: each row's (request seed, its step) -> one rng key per row [B], so a
  request samples the same tokens whatever it is batched with."""
  return jax.vmap(lambda c: jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), c[0]),
                                               c[1]))(counters)


def next_token(model, vocab_size, watch, params, final, keys, sampling, forced, penalties,
               history, output_from):
  """What follows each row's last fed hidden state final [B, D] (step_fn's arguments otherwise):
  (the next token [B] sampled from the penalised logits, the normalised hidden state [B, D], the
  log-probability of the row's next output token (forced or sampled) [B] and of each watched id
  [B, len(watch)], both from the model's unpenalised distribution)."""
  logits = model.apply({"params": params}, final[:, None], method=Decoder.logits)[:, 0]
  logits = logits.astype(jnp.float32)
  if vocab_size is not None:
    logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_size, logits, -jnp.inf)
  penalised = penalise(logits, penalties, history, output_from) if history.shape[1] else logits
  sampled = _sample(penalised, keys, sampling[:, 0], sampling[:, 1])
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  chosen = jnp.where(forced >= 0, forced, sampled)
  chosen_log_prob = jnp.take_along_axis(log_probs, chosen[:, None], axis=-1)[:, 0]
  watched = log_probs[:, jnp.asarray(watch, jnp.int32)] if watch else log_probs[:, :0]
  return sampled, l2_normalize(final), chosen_log_prob, watched


def step_fn(model, vocab_size, seed, watch, params, tokens, cache_len, cache, last, counters,
             sampling, forced, penalties, history, output_from, window):
  """Feeds tokens [B, T] after each row's cache_len [B], attending to the first `window` cache
  entries. counters int32 [B, 2]: (request seed, its step) of each row, which key its sampling
  (`row_keys`); sampling float32 [B, 2]: each row's (temperature, top_p); forced int32 [B]: the
  token a row's next output is forced to (-1: none); penalties float32 [B, 3], history int32
  [B, H], output_from int32 [B]: each row's penalties over its tokens so far (`penalise`; H == 0:
  no row has any, no work); watch: static token ids. Returns `next_token`'s four results at each
  row's `last` fed index, and the new cache."""
  hidden, cache = model.apply({"params": params}, tokens, cache_len, cache, window,
                              method=Decoder.extend)
  final = hidden[jnp.arange(tokens.shape[0]), last]  # [B, D]
  return (*next_token(model, vocab_size, watch, params, final, row_keys(seed, counters),
                      sampling, forced, penalties, history, output_from), cache)
