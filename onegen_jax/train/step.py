"""The OneGen train step: forward, L = lambda_g * L_gen + lambda_r * L_ret, AdamW update.

The step is built once per (model, optimizer, mesh) and jitted with explicit shardings:
  state  -> state_shardings (parameters and optimizer state sharded by the logical rules), donated
  batch  -> rows over ('data', 'fsdp'); query/key index arrays replicated
  output -> (state_shardings, replicated metrics)
With `accum_steps` > 1 every batch field has a leading micro-batch axis [M, ...] and the
gradients of the M micro-batches are summed in a `lax.scan`, each micro-batch normalised by the
whole batch's counts, so accumulation equals one large batch exactly for L_gen. In-batch
contrastive negatives then span one micro-batch, unless `negatives_across_micro_batches`
(InfoNCE): a two-pass step in the manner of GradCache (Gao et al., 2021) then equals the one
large batch for L_ret too.

With LoRA (`model.config.lora`) the state's params are the trainable tree only (adapters, token
rows, modules_to_save: model/lora.py `split`), so the optimizer state holds nothing for the
frozen base, which rides along in `TrainState.frozen` (never differentiated, never checkpointed:
it is rebuilt from the base at start and resume); every forward applies `lora.merge` of the two.
Adapter dropout draws its masks from `dropout_seed` folded with the step (and split per
micro-batch); evaluation runs without dropout.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from onegen_jax import losses, sharding
from onegen_jax.data.packing import ROW_FIELDS, merge_micro_batches
from onegen_jax.model import lora as lora_lib
from onegen_jax.model.decoder import Decoder
from onegen_jax.model.ret_vectors import gather_vectors


@flax.struct.dataclass
class TrainState:
  step: jnp.ndarray  # int32 scalar
  params: dict
  opt_state: optax.OptState
  frozen: dict | None = None  # LoRA: the frozen base (model/lora.py `split`); else None


@dataclasses.dataclass(frozen=True)
class LossConfig:
  loss_type: str = "bpr"  # "bpr" or "infonce"
  temperature: float = 0.02  # InfoNCE only
  lambda_gen: float = 1.0
  lambda_ret: float = 1.0
  # L_gen in this many sequence chunks (losses.chunked_cross_entropy_sum): the step never holds
  # the whole [rows, S, V] logits. 1: plain (one logits tensor).
  gen_chunks: int = 1
  # InfoNCE with accum_steps > 1: every query scored against the keys of all micro-batches, as in
  # one large batch (_two_pass_grads: one more forward per micro-batch). False: within its own.
  negatives_across_micro_batches: bool = False


def batch_shardings(mesh: Mesh, field_ndims: dict[str, int], micro: bool) -> dict:
  """NamedSharding per batch field: row arrays over ('data', 'fsdp') (axis 1 under a leading
  micro-batch axis), the small index arrays replicated."""
  return {name: sharding.batch_sharding(mesh, ndim, micro) if name in ROW_FIELDS
          else sharding.replicated(mesh) for name, ndim in field_ndims.items()}


@dataclasses.dataclass
class TrainProgram:
  """The model, its optimizer and the compiled init / train / eval functions on one mesh."""

  model: Decoder
  tx: optax.GradientTransformation
  mesh: Mesh
  state_shardings: TrainState
  abstract_state: TrainState  # ShapeDtypeStructs with the state shardings
  init: Callable[[jax.Array], TrainState]
  train_step: Callable[[TrainState, dict], tuple[TrainState, dict]]
  eval_step: Callable[[dict, dict], dict]
  schedule: optax.Schedule

  def init_state(self, seed: int) -> TrainState:
    with sharding.activate(self.mesh):
      return self.init(jax.random.key(seed))

  def step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    with sharding.activate(self.mesh):
      return sharding.wait_on_cpu(self.train_step(state, batch))

  def model_params(self, state: TrainState) -> dict:
    """The Decoder's whole 'params' tree of `state` (LoRA: trainable and frozen merged)."""
    if state.frozen is None:
      return state.params
    return lora_lib.merge(state.params, state.frozen, self.model.config.lora)

  def evaluate(self, params: dict, batch: dict) -> dict:
    """Loss and retrieval metrics of one batch without a micro-batch axis; params: the
    Decoder's whole tree (`model_params`)."""
    with sharding.activate(self.mesh):
      return sharding.wait_on_cpu(self.eval_step(params, batch))


def _apply(model: Decoder, params, frozen, rng, *args, method=None):
  """model.apply on `params` (with `frozen`: LoRA's trainable tree, merged with it); rng: the
  adapters' dropout key (None: no dropout)."""
  if frozen is not None:
    params = lora_lib.merge(params, frozen, model.config.lora)
  return model.apply({"params": params}, *args, method=method,
                     rngs=None if rng is None else {"dropout": rng})


def _hidden_states(model: Decoder, params, batch: dict, frozen=None, rng=None) -> jnp.ndarray:
  """The final hidden states [B, S, D] of one (micro-)batch, without the logits."""
  return _apply(model, params, frozen, rng, batch["tokens"], batch["segment_ids"],
                batch["positions"], method=Decoder.hidden_states)


def _gen_sums_and_hidden(model: Decoder, loss_cfg: LossConfig, params, batch: dict, frozen=None,
                         rng=None):
  """(L_gen's (sum, count), final hidden states [B, S, D]) of one (micro-)batch."""
  if loss_cfg.gen_chunks > 1:
    hidden = _hidden_states(model, params, batch, frozen, rng)
    logits_fn = lambda h: _apply(
        model, params, frozen, None, nn.with_logical_constraint(h, ("batch", "length", "act_embed")),
        method=Decoder.logits)
    return losses.chunked_cross_entropy_sum(logits_fn, hidden, batch["targets"],
                                            batch["loss_weight"], loss_cfg.gen_chunks), hidden
  logits, hidden = _apply(model, params, frozen, rng, batch["tokens"], batch["segment_ids"],
                          batch["positions"])
  return losses.cross_entropy_sum(logits, batch["targets"], batch["loss_weight"]), hidden


def _loss_and_sums(model: Decoder, loss_cfg: LossConfig, params, batch: dict, gen_total, ret_total,
                   frozen=None, rng=None):
  gen, hidden = _gen_sums_and_hidden(model, loss_cfg, params, batch, frozen, rng)
  sums = losses.loss_sums(None, hidden, batch, loss_cfg.loss_type, loss_cfg.temperature, gen)
  return losses.combine(sums, gen_total, ret_total, loss_cfg.lambda_gen, loss_cfg.lambda_ret), sums


def _slot_vectors(hidden: jnp.ndarray, batch: dict) -> tuple[jnp.ndarray, jnp.ndarray]:
  """float32 hidden states at the batch's query slots [Q, D] and key slots [K, D]."""
  return (gather_vectors(hidden, batch["query_index"]).astype(jnp.float32),
          gather_vectors(hidden, batch["key_index"]).astype(jnp.float32))


def _two_pass_grads(model, loss_cfg, params, batch, gen_total, ret_total, frozen, rngs):
  """Gradients and sums of InfoNCE over the keys of every micro-batch (GradCache's two passes).

  1. Each micro-batch's query and key vectors, without gradient; L_ret of the merged batch
     (`merge_micro_batches`: every query against all M x K keys) and its gradient d L / d vector.
  2. Per micro-batch, the gradient of lambda_g L_gen + <d L / d vector, vector(params)>: its
     L_gen gradient plus its vectors' share of L_ret's, by the chain rule.
  The sum over micro-batches equals the one large batch's gradient up to float32 summation order.
  batch: fields with the leading micro-batch axis [M, ...]; rngs: M dropout keys (both passes
  of a micro-batch draw the same masks) or None."""
  merged = merge_micro_batches(batch)

  def vectors(_, xs):
    micro, rng = xs
    return None, _slot_vectors(_hidden_states(model, params, micro, frozen, rng), micro)

  _, (queries, keys) = jax.lax.scan(vectors, None, (batch, rngs))  # [M, Q, D], [M, K, D]
  flat = lambda x: x.reshape(-1, x.shape[-1])

  zero = jnp.zeros((), jnp.float32)

  def retrieval_loss(q, k):
    ret = losses.retrieval_sums(q, k, merged, loss_cfg.loss_type, loss_cfg.temperature)
    sums = losses.LossSums(zero, zero, *ret)
    return losses.combine(sums, gen_total, ret_total, 0.0, loss_cfg.lambda_ret), ret

  (d_queries, d_keys), ret = jax.grad(retrieval_loss, argnums=(0, 1), has_aux=True)(
      flat(queries), flat(keys))

  def surrogate(p, micro, d_q, d_k, rng):
    gen, hidden = _gen_sums_and_hidden(model, loss_cfg, p, micro, frozen, rng)
    q, k = _slot_vectors(hidden, micro)
    loss_gen = losses.combine(losses.LossSums(*gen, zero, zero, zero), gen_total, ret_total,
                              loss_cfg.lambda_gen, 0.0)
    return loss_gen + jnp.sum(d_q * q) + jnp.sum(d_k * k), gen

  def accumulate(grads, xs):
    g, gen = jax.grad(surrogate, has_aux=True)(params, *xs)
    return jax.tree.map(jnp.add, grads, g), gen

  grads, (gen_sums, gen_counts) = jax.lax.scan(
      accumulate, jax.tree.map(jnp.zeros_like, params),
      (batch, d_queries.reshape(queries.shape), d_keys.reshape(keys.shape), rngs))
  return grads, losses.LossSums(jnp.sum(gen_sums), jnp.sum(gen_counts), *ret)


def grads_and_sums(model, loss_cfg, params, batch, accum_steps: int, frozen=None, rng=None):
  """Gradient of the whole batch's loss with respect to `params` and its summed losses,
  accumulating micro-batches. frozen: LoRA's frozen tree (`params` is then the trainable one);
  rng: the adapters' dropout key (None: none), split over the micro-batches."""
  gen_total, ret_total = losses.batch_totals(batch)
  rngs = None if rng is None or accum_steps == 1 else jax.random.split(rng, accum_steps)
  if accum_steps > 1 and loss_cfg.negatives_across_micro_batches:
    if loss_cfg.loss_type != "infonce":
      raise ValueError("loss.negatives_across_micro_batches needs loss_type='infonce' (BPR "
                       "scores each query against its own negatives only)")
    return _two_pass_grads(model, loss_cfg, params, batch, gen_total, ret_total, frozen, rngs)
  grad_fn = jax.grad(lambda p, b, r: _loss_and_sums(model, loss_cfg, p, b, gen_total, ret_total,
                                                    frozen, r), has_aux=True)
  if accum_steps == 1:
    return grad_fn(params, batch, rng)

  def accumulate(carry, xs):
    grads, sums = carry
    g, s = grad_fn(params, *xs)
    return (jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, sums, s)), None

  zero_sums = losses.LossSums(*([jnp.zeros((), jnp.float32)] * len(losses.LossSums._fields)))
  (grads, sums), _ = jax.lax.scan(accumulate, (jax.tree.map(jnp.zeros_like, params), zero_sums),
                                  (batch, rngs))
  return grads, sums


def _train_step(model: Decoder, tx: optax.GradientTransformation, schedule: optax.Schedule,
                loss_cfg: LossConfig, accum_steps: int, nan_policy: str, dropout_seed: int | None):
  """train_step(state, batch) -> (the next TrainState, metrics): one optimizer step over the
  batch's accum_steps micro-batches. nan_policy "skip": a step whose loss or gradient norm is not
  finite keeps the parameters and optimizer state (metric `skipped`). dropout_seed (None: no
  dropout) with the step number seeds the adapters' dropout masks."""

  def train_step(state: TrainState, batch: dict):
    rng = (None if dropout_seed is None
           else jax.random.fold_in(jax.random.key(dropout_seed), state.step))
    grads, sums = grads_and_sums(model, loss_cfg, state.params, batch, accum_steps, state.frozen,
                                 rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = losses.metrics(sums)
    metrics["loss"] = losses.combine(sums, sums.gen_count, sums.ret_count, loss_cfg.lambda_gen,
                                     loss_cfg.lambda_ret)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["learning_rate"] = schedule(state.step)
    new_state = TrainState(state.step + 1, params, opt_state, state.frozen)
    if nan_policy == "skip":
      finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
      kept = lambda x: x.replace(frozen=None)  # the frozen base passes through untouched
      new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), kept(new_state),
                               kept(state.replace(step=state.step + 1))).replace(frozen=state.frozen)
      metrics["skipped"] = 1.0 - finite.astype(jnp.float32)
    return new_state, metrics

  return train_step


def build_train_program(model: Decoder, tx: optax.GradientTransformation, schedule: optax.Schedule,
                        loss_cfg: LossConfig, mesh: Mesh, batch_spec: dict,
                        accum_steps: int = 1, nan_policy: str = "stop",
                        dropout_seed: int = 0) -> TrainProgram:
  """Builds the sharded init and the jitted train/eval steps.

  batch_spec: one training batch (arrays or ShapeDtypeStructs), with the leading micro-batch axis
  when accum_steps > 1; evaluation batches have no such axis.
  nan_policy: "stop" (the caller stops on a non-finite loss) or "skip" (a step whose loss or
  gradient is not finite leaves parameters and optimizer state unchanged; metric `skipped` = 1).
  With `model.config.lora`, the state holds the trainable tree, its optimizer state and the
  frozen tree (module doc); dropout_seed: the adapters' dropout masks (lora.dropout > 0).
  """
  if nan_policy not in ("stop", "skip"):
    raise ValueError(f"nan_policy={nan_policy!r}; expected 'stop' or 'skip'")
  probe = jnp.zeros((1, 8), jnp.int32)
  lora = model.config.lora
  init_params = lambda rng: model.init(rng, probe, probe + 1, jnp.arange(8)[None])["params"]

  def init_boxed(rng):
    params, frozen = init_params(rng), None
    if lora is not None:
      params, frozen = lora_lib.split(params, lora)
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), frozen)

  with sharding.activate(mesh):
    abstract = jax.eval_shape(lambda: init_boxed(jax.random.key(0)))
    abstract_params = jax.eval_shape(lambda: init_params(jax.random.key(0)))
  state_shardings = sharding.logical_to_sharding(nn.get_partition_spec(abstract), mesh)
  params_shardings = sharding.logical_to_sharding(nn.get_partition_spec(abstract_params), mesh)
  abstract_state = sharding.with_shardings(nn.unbox(abstract), state_shardings)
  init = jax.jit(lambda rng: nn.unbox(init_boxed(rng)), out_shardings=state_shardings)
  dropout_seed = dropout_seed if lora is not None and lora.dropout > 0 else None
  train_step = _train_step(model, tx, schedule, loss_cfg, accum_steps, nan_policy, dropout_seed)

  def eval_step(params: dict, batch: dict):
    gen_total, ret_total = losses.batch_totals(batch)
    _, sums = _loss_and_sums(model, loss_cfg, params, batch, gen_total, ret_total)
    return losses.metrics(sums)

  micro = accum_steps > 1
  train_ndims = {name: value.ndim for name, value in batch_spec.items()}
  in_batch = batch_shardings(mesh, train_ndims, micro)
  eval_batch = batch_shardings(mesh, {name: n - micro for name, n in train_ndims.items()}, False)
  repl = sharding.replicated(mesh)
  return TrainProgram(
      model=model, tx=tx, mesh=mesh, state_shardings=state_shardings,
      abstract_state=abstract_state, init=init,
      train_step=jax.jit(train_step, in_shardings=(state_shardings, in_batch),
                         out_shardings=(state_shardings, repl), donate_argnums=0),
      eval_step=jax.jit(eval_step, in_shardings=(params_shardings, eval_batch),
                        out_shardings=repl),
      schedule=schedule)
