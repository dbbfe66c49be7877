"""One train step for every method, and the eval step.

The step is ``(state, batch, reference) -> (state, metrics)`` under one
``jax.jit``. ``reference`` holds what the regularizers compare against: the
variables fine-tuning started from (source backbone + new head; L2-SP's
``w0`` and the frozen network KnowDist/DELTA take feature maps from) and
DELTA's channel attention; how much they weigh: λ and its decay
(:class:`RegWeight`); and the learning rate with its drops
(:class:`LearningRate`). It is an argument, not a closure, so runs from
different sources, seeds, λ or learning rates reuse one compiled step
(``Reference.of(config, variables)`` holds a run's).

BatchNorm during fine-tuning: the target network runs in train mode, so it
normalizes with the statistics of the batch and updates its running
statistics (Flax momentum 0.9, PyTorch's 0.1) — what torchvision fine-tuning
does with ``model.train()``; evaluation uses the running statistics. The
frozen source network always runs in eval mode (its own running statistics),
as in the DELTA authors' code. The BatchNorm scales and biases are trained.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

import dtnh_jax
from dtnh_jax import names, regularizers
from dtnh_jax.train import guard
from dtnh_jax.train.config import STEP_GROUPS, TrainConfig

__all__ = [
    "backbone_tensor_count",
    "base_optimizer",
    "closed_form_regularizers",
    "create_train_state",
    "cross_entropy",
    "epoch_schedule",
    "evaluate",
    "feature_regularizer",
    "head_mask",
    "LearningRate",
    "learning_rate_schedule",
    "make_eval_step",
    "make_optimizer",
    "make_train_step",
    "Reference",
    "reg_weight_schedule",
    "RegWeight",
    "released_code_schedule",
    "Steps",
    "steps_for",
    "TrainState",
]

PyTree = Any


class TrainState(flax.struct.PyTreeNode):
  """Everything a run needs to continue bit-exactly from a checkpoint."""

  step: jax.Array
  params: PyTree
  batch_stats: PyTree
  opt_state: PyTree
  rng: jax.Array


class RegWeight(NamedTuple):
  """λ's settings as inputs of the train step, not constants compiled into it: a sweep over them runs one
  compiled step. ``RegWeight.of(config)`` holds ``config``'s as float32 scalars."""

  reg_weight: Any   # λ at the first epoch
  reg_decay: Any    # its decay factor (see reg_weight_schedule)

  @classmethod
  def of(cls, config: TrainConfig) -> "RegWeight":
    return cls(np.float32(config.recipe.reg_weight), np.float32(config.recipe.reg_decay))


class LearningRate(NamedTuple):
  """The learning rate's settings as inputs of the train step, not constants compiled into it: a sweep over
  them runs one compiled step per number of drops. ``LearningRate.of(config)`` holds ``config``'s: the initial
  rate and the factor as float32 scalars, the drop steps sorted and distinct as int32 (see
  :func:`learning_rate_schedule`)."""

  learning_rate: Any  # at step 0
  drop_steps: Any     # the steps at which it is multiplied by drop_factor, ascending
  drop_factor: Any

  @classmethod
  def of(cls, config: TrainConfig) -> "LearningRate":
    recipe = config.recipe
    return cls(np.float32(recipe.learning_rate), np.asarray(sorted(set(recipe.lr_drop_steps)), np.int32),
               np.float32(recipe.lr_drop_factor))


def learning_rate_schedule(learning_rate: LearningRate) -> optax.Schedule:
  """``optax.piecewise_constant_schedule(learning_rate, {step: drop_factor for step in drop_steps})``, computed
  as it computes it (one factor per drop step passed, in ascending order), for settings that may be traced."""
  value, drop_steps, drop_factor = learning_rate

  def schedule(count):
    rate = value
    for index in range(len(drop_steps)):  # the drops' number is static: the input's shape
      indicator = jnp.maximum(0.0, jnp.sign(drop_steps[index] - count))
      rate = rate * indicator + (1 - indicator) * drop_factor * rate
    return rate

  return schedule


class Reference(NamedTuple):
  """What the regularizers compare the target network with, and the run's settings that are inputs of its
  compiled step (fixed during a run). ``Reference.of(config, variables)`` is a run's."""

  variables: PyTree           # {"params", "batch_stats"} fine-tuning started from
  attention: PyTree = None    # DELTA's per-layer channel attention, else None
  # λ and its decay, the learning rate and its drops; None: the config's, compiled into the step
  # (make_train_step; steps_for's steps need them)
  reg_weight: RegWeight | None = None
  learning_rate: LearningRate | None = None

  @classmethod
  def of(cls, config: TrainConfig, variables: PyTree, attention: PyTree = None) -> "Reference":
    """The reference of a run of ``config`` from ``variables``, with ``config``'s λ, decay, learning rate and
    drops as inputs of the step (:class:`RegWeight`, :class:`LearningRate`)."""
    return cls(variables, attention, RegWeight.of(config), LearningRate.of(config))


def base_optimizer(config: TrainConfig, *, guarded: bool = False,
                   learning_rate: LearningRate | None = None) -> optax.GradientTransformation:
  """``config.recipe.optimizer`` with step-wise learning rate drops: what follows DTNH in :func:`make_optimizer`;
  with SGD ``weight_decay``, and for KnowDist and DELTA ``head_beta``'s ``β·w`` on the head, are added first.

  ``optimizer="sgd"`` is the paper's SGD with momentum; ``"adamw"`` is
  ``optax.adamw`` (b1 0.9, b2 0.999) with ``config.recipe.weight_decay``.
  With ``guarded``, the same optimizer and state whose ``update`` takes ``finite=`` and changes nothing when
  it is false (:mod:`dtnh_jax.train.guard`): what the train steps run. The learning rate follows
  :func:`learning_rate_schedule` of ``learning_rate`` (traced in a train step), else of ``config``'s.
  """
  learning_rate = learning_rate_schedule(LearningRate.of(config) if learning_rate is None else learning_rate)
  if config.recipe.optimizer == "adamw":
    adamw = optax.adamw(learning_rate, weight_decay=config.recipe.weight_decay)
    chain = [guard.guarded(adamw) if guarded else adamw]
  else:
    sgd = guard.guarded_sgd if guarded else optax.sgd
    chain = [sgd(learning_rate, momentum=config.recipe.momentum)]
    if config.recipe.weight_decay:  # added to DTNH's direction, after the projection (the released code's order)
      chain.insert(0, optax.add_decayed_weights(config.recipe.weight_decay))
  if config.regularizer.head_beta and config.method_spec.regularizer in ("knowdist", "delta"):
    # the official KnowDist/DELTA code's β/2·|head|²: its gradient added to the direction, unprojected
    chain.insert(0, optax.add_decayed_weights(config.regularizer.head_beta, mask=head_mask))
  return chain[0] if len(chain) == 1 else optax.chain(*chain)


#: The released code's λ counter: it advances once per regularized tensor per step, λ decays every this many.
RELEASED_CODE_DECAY_COUNT = 5000


def released_code_schedule(reg_weight: float | jax.Array, reg_decay: float | jax.Array,
                           num_tensors: int) -> optax.Schedule:
  """λ as the released DTNH code computes it (``grod.py``, ``GrodOptimizer.minimize``; see docs/guides/regularizers.md).

  Its counter starts at 1 and advances once per regularized tensor on every
  step but the first, which it leaves unregularized; a tensor's λ is
  ``reg_weight · reg_decay^(counter // 5000)``. Per step this is
  ``λ(0) = 0`` and ``λ(k) = reg_weight · reg_decay^((1 + (k - 1) · num_tensors) // 5000)``: the counter at the
  step's first tensor (the step's later tensors may see one more decay at a boundary, every
  ``5000 / num_tensors`` steps). ``reg_weight`` and ``reg_decay`` may be traced (:class:`RegWeight`).
  """

  def schedule(count):
    counter = 1 + (jnp.maximum(count, 1) - 1) * num_tensors
    weight = reg_weight * jnp.power(jnp.float32(reg_decay), (counter // RELEASED_CODE_DECAY_COUNT).astype(jnp.float32))
    return jnp.where(count == 0, 0.0, weight)

  return schedule


def epoch_schedule(reg_weight: float | jax.Array, reg_decay: float | jax.Array,
                   steps_per_epoch: int) -> optax.Schedule:
  """λ = ``reg_weight · reg_decay^epoch`` with epochs of ``steps_per_epoch`` steps: ``optax.exponential_decay``
  with ``staircase=True``, computed as it does, for a ``reg_weight`` and ``reg_decay`` that may be traced
  (:class:`RegWeight`). As it, a ``reg_decay`` of 0 is no decay (λ = ``reg_weight`` throughout)."""

  def schedule(count):
    decayed = jnp.where(count <= 0, reg_weight, reg_weight * jnp.power(reg_decay, jnp.floor(count / steps_per_epoch)))
    return jnp.where(reg_decay == 0, reg_weight, decayed)

  return schedule


def reg_weight_schedule(config: TrainConfig, steps_per_epoch: int, num_tensors: int | None = None,
                        reg_weight: RegWeight | None = None) -> optax.Schedule:
  """λ at each step: ``reg_weight`` times ``reg_decay`` once per epoch of ``steps_per_epoch`` steps
  (:func:`epoch_schedule`), or with ``reg_schedule="released-code"`` :func:`released_code_schedule` over
  ``num_tensors`` regularized tensors (the backbone's). ``reg_weight``: λ's settings (traced in a train step),
  else ``config``'s."""
  if reg_weight is None:
    reg_weight = RegWeight(config.recipe.reg_weight, config.recipe.reg_decay)
  if config.recipe.reg_schedule == "released-code":
    if num_tensors is None:
      raise ValueError("reg_schedule='released-code' counts the regularized tensors: pass num_tensors.")
    return released_code_schedule(*reg_weight, num_tensors)
  return epoch_schedule(*reg_weight, max(1, steps_per_epoch))


def head_mask(params: PyTree, head: str = "fc") -> PyTree:
  """``True`` at the leaves of the new head (top-level module ``head``), ``False`` elsewhere: DTNH's
  ``unprojected`` mask when ``project_head`` is off."""
  return {name: jax.tree.map(lambda _, is_head=name == head: is_head, subtree) for name, subtree in params.items()}


def make_optimizer(config: TrainConfig, steps_per_epoch: int, *,
                   num_tensors: int | None = None) -> optax.GradientTransformation:
  """DTNH first, then :func:`base_optimizer`; λ follows :func:`reg_weight_schedule`.

  DTNH does not care which optimizer follows: it turns the two gradients into
  one direction ``d``, and the optimizer treats ``d`` as it would any
  gradient. The plain regularized methods use ``dtnh(..., projection="none")``:
  the same transformation computing ``g + λ r`` and the same diagnostics, so
  that the only difference between a method and its DTNH variant is the
  projection (on the steps that log no angles, a plain method's step skips
  this transformation and takes one backward pass of ``J + λ Ω``:
  :func:`make_train_step`'s ``summed``). Fine-tuning has no
  regularizer and no DTNH. ``num_tensors`` (the backbone's tensors) is
  needed by ``reg_schedule="released-code"`` only.
  """
  optimizer = base_optimizer(config)
  if not config.method_spec.has_regularizer:
    return optimizer
  return optax.chain(make_correction(config, steps_per_epoch, num_tensors=num_tensors), optimizer)


def make_correction(config: TrainConfig, steps_per_epoch: int, *, num_tensors: int | None = None,
                    reg_weight: RegWeight | None = None) -> optax.GradientTransformation:
  """The first element of :func:`make_optimizer`'s chain for a regularized method: ``dtnh`` (``projection="none"``
  for the plain methods), or the aggregator or never-hurt candidate (``dtnh_jax.corrections``)
  ``config.dtnh.projection`` names, with its own options from ``config.dtnh``, with λ's schedule
  (:func:`reg_weight_schedule`; its state is the same whatever λ)."""
  method = config.method_spec
  if not method.has_regularizer:
    raise ValueError(f"{method.name} has no regularizer, so no correction.")
  reg_weight = reg_weight_schedule(config, steps_per_epoch, num_tensors, reg_weight)
  options = config.dtnh
  unprojected = None if options.project_head else head_mask
  if method.dtnh and options.projection in names.CORRECTIONS:  # the never-hurt candidates
    from dtnh_jax import corrections  # pylint: disable=g-import-not-at-top
    common = {"granularity": options.granularity, "unprojected": unprojected}
    if options.projection == "share-bound":
      return corrections.share_bound(reg_weight, kappa=options.share_bound_kappa,
                                     projection=options.share_bound_projection,
                                     reference=options.share_bound_reference, decay=options.ema_decay, **common)
    if options.projection == "ema":
      return corrections.ema_projection(reg_weight, decay=options.ema_decay,
                                        guard_current=options.ema_guard_current, **common)
    return corrections.subspace_projection(reg_weight, memory=options.subspace_memory, **common)
  if method.dtnh and options.projection in names.AGGREGATORS:
    from dtnh_jax import aggregators  # pylint: disable=g-import-not-at-top
    extra = {"c": options.cagrad_c} if options.projection == "cagrad" else {}
    return getattr(aggregators, options.projection)(reg_weight, granularity=options.granularity,
                                                    unprojected=unprojected, **extra)
  return dtnh_jax.dtnh(reg_weight, granularity=options.granularity,
                       projection=options.projection if method.dtnh else "none",
                       max_angle=options.max_angle if method.dtnh else None, unprojected=unprojected)


def create_train_state(variables: PyTree, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
  """A fresh state; it owns copies of ``variables`` (the step donates its state,
  and the originals stay in use as the regularizers' reference)."""
  variables = jax.tree.map(jnp.array, variables)
  params = variables["params"]
  return TrainState(step=jnp.zeros([], jnp.int32), params=params, batch_stats=variables.get("batch_stats", {}),
                    opt_state=tx.init(params), rng=rng)


def _all_finite(tree: PyTree) -> jax.Array:
  """Whether every value of ``tree`` is finite (a scalar bool).

  One check over one vector: the scalars' values, and for each array a scalar that is NaN where the array holds a
  non-finite value. A conjunction of per-leaf checks was rewritten by XLA into a chain of scalar ``and``s that it
  then copied into every fusion reading the result: a large share of the compiled program (its size and compile
  time before and after: benchmarks/RESULTS.md, "The guard's check compiled once").
  """
  values = [jnp.ravel(leaf).astype(jnp.float32) if jnp.size(leaf) == 1 else
            jnp.where(jnp.all(jnp.isfinite(leaf)), 0.0, jnp.nan).astype(jnp.float32)[None]
            for leaf in jax.tree.leaves(tree)]
  return jnp.all(jnp.isfinite(jnp.concatenate(values)))


def cross_entropy(logits, labels):
  """The empirical loss J: softmax cross-entropy with integer labels, averaged over the batch, in float32
  whatever the compute dtype."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()


def closed_form_regularizers(config: TrainConfig, reference: Reference) -> list[dtnh_jax.ClosedFormRegularizer]:
  """``config``'s regularizers whose gradient is known in closed form, for ``split_value_and_grad(closed_form=...)``.

  L2, or L2-SP toward ``reference``'s parameters; an empty list for the other methods.
  """
  method = config.method_spec.regularizer
  if method == "l2":
    return [regularizers.l2_regularizer(config.regularizer.l2_weight)]
  if method == "l2-sp":
    coefficients = config.regularizer
    return [regularizers.l2_sp_regularizer(reference.variables["params"], coefficients.l2_sp_alpha,
                                           coefficients.l2_sp_beta, include=coefficients.l2_sp_include)]
  return []


def feature_regularizer(config: TrainConfig, reference: Reference) -> Callable | None:
  """``(target_features, source_features) -> weighted Ω`` for KnowDist and DELTA, ``None`` for the other methods.

  The weight is the method's own (``knowdist_weight``, ``delta_weight`` of ``config.regularizer``); DELTA reads
  its channel attention from ``reference``.
  """
  method = config.method_spec.regularizer
  coefficients = config.regularizer
  options = {"layers": coefficients.feature_layers, "normalize": coefficients.feature_normalize}
  if method == "knowdist":
    return lambda feats, source: coefficients.knowdist_weight * regularizers.feature_distance(feats, source, **options)
  if method == "delta":
    return lambda feats, source: coefficients.delta_weight * regularizers.delta(feats, source, reference.attention,
                                                                                **options)
  return None


def backbone_tensor_count(model, config: TrainConfig) -> int:
  """How many parameter tensors ``model`` has outside its head ``fc`` (shapes only, nothing computed)."""
  size = config.recipe.crop
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False))
  return sum(len(jax.tree.leaves(subtree)) for name, subtree in shapes["params"].items() if name != "fc")


class Steps(NamedTuple):
  """The compiled-to-be functions of a run (unjitted; ``Placement`` jits them)."""

  tx: optax.GradientTransformation  # the optimizer whose state the steps update (its λ is not the run's)
  train_step: Callable           # every step of DTNH and fine-tuning; a plain method's steps that log angles
  eval_step: Callable
  # a plain regularized method's other steps: one backward pass of J + λΩ, no angles (else None)
  summed_train_step: Callable | None = None

  def train_step_at(self, step: int, log_every: int, last_step: int) -> Callable:
    """The train step that computes step ``step`` (1-based): :attr:`summed_train_step` where there is one,
    except on the steps whose angles are logged (every ``log_every``-th and the last)."""
    if self.summed_train_step is None or step % log_every == 0 or step == last_step:
      return self.train_step
    return self.summed_train_step


@functools.lru_cache(maxsize=32)
def _cached_steps(model, step_key: tuple, steps_per_epoch: int) -> Steps:
  # the key's λ and decay are placeholders (config.STEP_INPUTS): the steps read the run's from their reference
  config = dataclasses.replace(TrainConfig(method=step_key[0]), **dict(zip(STEP_GROUPS, step_key[1:], strict=True)))
  num_tensors = backbone_tensor_count(model, config) if config.recipe.reg_schedule == "released-code" else None
  tx = make_optimizer(config, steps_per_epoch, num_tensors=num_tensors)
  method = config.method_spec
  options = {"num_tensors": num_tensors, "step_inputs": True}
  summed = None
  if method.has_regularizer and not method.dtnh:
    summed = make_train_step(model, config, steps_per_epoch, summed=True, **options)
  return Steps(tx, make_train_step(model, config, steps_per_epoch, **options), _cached_eval_step(model), summed)


@functools.lru_cache(maxsize=8)
def _cached_eval_step(model) -> Callable:
  # every method's runs of one model evaluate with the same function, so they trace and compile it once
  return make_eval_step(model)


def steps_for(model, config: TrainConfig, steps_per_epoch: int) -> Steps:
  """The :class:`Steps` of ``config``, the same function objects for every config with the same
  :meth:`~dtnh_jax.train.config.TrainConfig.step_key`: a grid of runs (seeds, sources, λ and its decay, learning
  rates and their drops, numbers of steps, bookkeeping) traces and compiles each method once when
  ``dtnh_jax.train.sharding.Placement`` jits them.

  Their train steps read λ, its decay, the learning rate and its drops from the reference they are called
  with: ``Reference.of(config, variables)``.
  """
  return _cached_steps(model, config.step_key(), steps_per_epoch)


def make_train_step(model, config: TrainConfig, steps_per_epoch: int, *, num_tensors: int | None = None,
                    summed: bool = False, step_inputs: bool = False):
  """The train step of ``config``'s method, ``(state, batch, reference) -> (state, metrics)``, unjitted:
  ``dtnh_jax.train.sharding.Placement.jit_train_step`` jits it with its shardings and donates the state.

  λ and its decay (``reference.reg_weight``, :class:`RegWeight`) and the learning rate and its drops
  (``reference.learning_rate``, :class:`LearningRate`) are inputs of the compiled step, so runs that differ
  only in them share it; a reference without them takes ``config``'s, compiled in. With ``step_inputs`` the
  reference must hold them (the steps of :func:`steps_for`, made from a
  :meth:`~dtnh_jax.train.config.TrainConfig.step_key`'s config, whose λ and learning rate are not the run's).

  The state's optimizer is :func:`make_optimizer`'s (same ``steps_per_epoch`` and ``num_tensors``), which the
  step runs in two parts: the correction (:func:`make_correction`), then the NaN/Inf guard's decision, then
  :func:`base_optimizer` guarded (``guarded=True``: a non-finite step changes neither the parameters nor the
  optimizer state nor the BatchNorm statistics; the step counter, the RNG and the data position advance).

  By default the regularized methods hold the two gradients apart
  (``split_value_and_grad``) and hand them to the correction,
  which logs the angles between them. With ``summed``, a plain regularized method's step is
  the method as usually written: one backward pass of ``J + λ Ω`` (a closed-form
  regularizer's gradient added), then :func:`base_optimizer`; no angles are
  computed, and no closed-form regularizer's value either (L2, L2-SP: a pass
  over the weights and ``w0`` that the update does not need; its cost is in
  benchmarks/RESULTS.md, the site's Results page): such a step's metrics have
  ``loss_regularizer`` and ``loss_total`` only where Ω is traced (KnowDist,
  DELTA); the steps that log angles have them for every method. It reads and
  writes the same state as the default step (the correction's step counter
  advances, its diagnostics stay those of the last step that computed them),
  so the two can alternate within a run.
  """
  method = config.method_spec
  if summed and (method.dtnh or not method.has_regularizer):
    raise ValueError(f"summed=True is for the plain regularized methods; {method.name} has no such step.")

  def train_step(state: TrainState, batch: dict[str, jax.Array], reference: Reference):
    if step_inputs and (reference.learning_rate is None or method.has_regularizer and reference.reg_weight is None):
      raise ValueError("this train step reads λ, its decay, the learning rate and its drops from its reference, "
                       "and it holds none: pass Reference.of(config, variables).")
    # built here: the schedules close over the step's inputs (the optimizer state is the same whatever they are)
    base = base_optimizer(config, guarded=True, learning_rate=reference.learning_rate)
    correction = (make_correction(config, steps_per_epoch, num_tensors=num_tensors, reg_weight=reference.reg_weight)
                  if method.has_regularizer and not summed else None)
    summed_reg_weight = (reg_weight_schedule(config, steps_per_epoch, num_tensors, reference.reg_weight)
                         if summed else None)
    removed_fraction = None
    images, labels = batch["image"], batch["label"]
    feature_term = feature_regularizer(config, reference)
    closed_form = closed_form_regularizers(config, reference)
    source_features = (
        regularizers.source_features(model, reference.variables, images, config.regularizer.feature_layers)
        if feature_term is not None else None)

    def loss_terms(params):
      variables = {"params": params, "batch_stats": state.batch_stats}
      (logits, features), updated = model.apply(
          variables, images, train=True, return_features=True, mutable=["batch_stats"])
      terms = (cross_entropy(logits, labels),)
      if feature_term is not None:
        terms += (feature_term(features, source_features),)
      return terms, (updated["batch_stats"], logits)

    if summed:
      correction_state, base_state = state.opt_state
      reg_weight = jnp.asarray(summed_reg_weight(correction_state.count), jnp.float32)
      values, (batch_stats, logits), traced = _summed_gradient(loss_terms, reg_weight, state.params)
      grads = _add_closed_form(traced, closed_form, reg_weight, state.params)
      # The traced gradient, not the sum: a closed form of finite parameters is finite, and reading g + λr
      # here would make XLA write it out in a pass of its own instead of forming it inside the update.
      finite = _all_finite((values, traced))
      updates, base_state = base.update(grads, base_state, state.params, finite=finite)
      correction_state = optax.tree.where(
          finite, correction_state._replace(count=optax.safe_increment(correction_state.count)), correction_state)
      opt_state = (correction_state, base_state)
    else:
      # "retrace": each term's backward pass holds only its own path; XLA merges
      # the forward passes (see split_value_and_grad).
      grad_fn = dtnh_jax.split_value_and_grad(loss_terms, has_aux=True, closed_form=closed_form, backward="retrace")
      (values, (batch_stats, logits)), grads = grad_fn(state.params)
      # DTNH's passes over the gradients start after the backward passes end: left
      # free, XLA:CPU runs the inner products alongside the convolutions, which
      # slows both (measured in benchmarks/RESULTS.md, "Train step").
      grads = jax.lax.optimization_barrier(grads)
      if method.has_regularizer:
        correction_state, base_state = state.opt_state
        direction, new_correction_state = correction.update(grads, correction_state, state.params)
        # The check reads no parameter-sized array: the diagnostics' norms and inner products are finite
        # exactly when both gradients are, and then so is DTNH's direction (|d| <= |g| + 2 Σ λ|r|) and the
        # SGD update, barring float32 overflow. Deciding before the update is formed lets the guarded
        # optimizer select inside the update's own pass.
        diagnostics = optax.tree.get(new_correction_state, "diagnostics")  # this step's, also when it is skipped
        # the never-hurt candidates' share of λ∇Ω they took away (dtnh_jax.corrections.CorrectionState)
        removed_fraction = getattr(new_correction_state, "removed_fraction", None)
        reg_weight = diagnostics.reg_weight
        finite = _all_finite((values, diagnostics))
        updates, base_state = base.update(direction, base_state, state.params, finite=finite)
        opt_state = (optax.tree.where(finite, new_correction_state, correction_state), base_state)
      else:
        finite = _all_finite((values, grads))
        updates, opt_state = base.update(grads[0], state.opt_state, state.params, finite=finite)
    # A NaN/Inf loss or update is never applied: the guarded optimizer kept its state and emitted zeros;
    # parameters and BatchNorm statistics keep their last good values (selects, not a branch: one program for
    # every step; the parameters' select reads the update the optimizer formed, so it costs no pass of its
    # own). The loop stops the run or goes on (config.run.on_nonfinite).
    params = optax.tree.where(finite, optax.apply_updates(state.params, updates), state.params)
    batch_stats = optax.tree.where(finite, batch_stats, state.batch_stats)

    metrics = {
        "loss_empirical": values[0],
        "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
        "skipped": jnp.logical_not(finite).astype(jnp.float32),
    }
    if method.has_regularizer:
      metrics["reg_weight"] = reg_weight
    if method.has_regularizer and len(values) > 1:  # the summed step computes no closed-form value
      metrics.update(loss_regularizer=values[1], loss_total=values[0] + reg_weight * values[1])
    if method.has_regularizer and not summed:
      metrics.update(
          conflict=diagnostics.conflict,
          angle1=diagnostics.angle1, angle2=diagnostics.angle2,
          angle3=diagnostics.angle3, angle4=diagnostics.angle4,
          inner_product=diagnostics.inner_product,
          empirical_norm=diagnostics.empirical_norm,
          regularizer_norm=diagnostics.regularizer_norm,
      )
      if removed_fraction is not None:
        metrics["removed_fraction"] = removed_fraction
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state,
                              rng=jax.random.fold_in(state.rng, state.step))
    return new_state, metrics

  if summed:  # its own name in jax's logs and profiles
    train_step.__name__ = train_step.__qualname__ = "summed_train_step"
  return train_step


def _summed_gradient(loss_terms, reg_weight, params):
  """``(values, aux, grad)`` of ``J + λ Ω`` in one backward pass: ``loss_terms(params) -> ((J, Ω...), aux)``
  differentiated as their λ-weighted sum; ``values`` are the traced terms, ``(J,)`` or ``(J, Ω)``."""

  def total(params):
    terms, aux = loss_terms(params)
    return terms[0] + reg_weight * sum(terms[1:], jnp.zeros([], jnp.float32)), (terms, aux)

  (_, (terms, aux)), grad = jax.value_and_grad(total, has_aux=True)(params)
  return terms, aux, grad


def _add_closed_form(grad, closed_form, reg_weight, params):
  """``grad`` plus λ times each closed-form regularizer's gradient (leaves it leaves out: unchanged). Their
  values are not computed: the update does not need them."""
  for regularizer in closed_form:
    grad = jax.tree.map(lambda r, g: g if r is None else g + reg_weight * r, regularizer.grad(params), grad,
                        is_leaf=lambda x: x is None)
  return grad


def make_eval_step(model):
  """Sums of test loss and correct predictions over the real (``mask``) examples of a batch, unjitted
  (``Placement.jit_eval_step`` jits it)."""

  def eval_step(state: TrainState, batch: dict[str, jax.Array]):
    logits = model.apply({"params": state.params, "batch_stats": state.batch_stats}, batch["image"], train=False)
    mask = batch.get("mask", jnp.ones(batch["label"].shape, bool)).astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["label"])
    correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    return {"loss_sum": jnp.sum(losses * mask), "correct": jnp.sum(correct * mask), "count": jnp.sum(mask)}

  return eval_step


def evaluate(eval_step, state: TrainState, batches, split: str = "test") -> dict[str, float]:
  """Loss and accuracy over a whole split (partial last batch counted exactly), as ``{split}_loss`` and
  ``{split}_accuracy``."""
  totals = None
  for batch in batches:
    sums = eval_step(state, batch)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  count = float(totals["count"])
  return {f"{split}_loss": float(totals["loss_sum"]) / count, f"{split}_accuracy": float(totals["correct"]) / count}
