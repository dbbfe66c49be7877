"""``dtnh()``: DTNH as an optax gradient transformation, its state and options."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dtnh_jax import names
from dtnh_jax import projection as projection_lib
from dtnh_jax.projection import Diagnostics

__all__ = [
    "dtnh",
    "DTNHState",
    "flatten_regularizer",
    "gram_transformation",
    "projection_groups",
    "regularizer_list",
]

PyTree = Any
ScalarOrSchedule = Union[float, jax.Array, optax.Schedule]
Granularity = Union[str, PyTree, Callable[[PyTree], PyTree]]


class DTNHState(NamedTuple):
  """State of :func:`dtnh`: a step counter (for schedules) and the last diagnostics."""

  count: jax.Array
  diagnostics: Diagnostics


def _is_structural_zero(x) -> bool:
  return x is None or isinstance(x, optax.MaskedNode)


def _is_masked(x) -> bool:
  return isinstance(x, optax.MaskedNode)


def _keystr(path) -> str:
  return jax.tree_util.keystr(path) or "<root>"


def _under(path, prefix) -> bool:
  return tuple(path[:len(prefix)]) == tuple(prefix)


def flatten_regularizer(empirical_paths, empirical_leaves, regularizer, index: int,
                        name: str = "dtnh") -> list:
  """Leaves of one regularizer gradient aligned with the empirical ones: how :func:`dtnh` reads ``r``.

  ``None`` and ``optax.MaskedNode()`` stand for leaves (or whole subtrees, e.g.
  ``{"fc": None}`` for a new head) that the regularizer does not touch. Where
  the *empirical* leaf is an ``optax.MaskedNode`` (dtnh inside ``optax.masked``
  or one branch of ``optax.multi_transform``), that leaf belongs to another
  branch: the regularizer's leaves there are dropped and nothing is returned
  for it. :func:`~dtnh_jax.multi_steps` reads the regularizer gradients it
  accumulates with it, so both accept the same trees.

  Args:
    empirical_paths: the key paths of the empirical gradient's leaves
      (``jax.tree_util.tree_flatten_with_path``, ``optax.MaskedNode`` a leaf).
    empirical_leaves: those leaves, in the same order.
    regularizer: one regularizer gradient, a pytree of the parameters'
      structure in which ``None`` or ``optax.MaskedNode()`` may replace leaves
      or subtrees.
    index: the regularizer's number (from 1) in the messages when there are
      several, else 0.
    name: the transformation named in the messages.

  Returns:
    One entry per empirical leaf that is not an ``optax.MaskedNode``: the
    regularizer's leaf, or ``None`` where it does not touch that leaf.

  Raises:
    ValueError: naming the first path where the trees differ, or a leaf whose
      shape differs.
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(regularizer, is_leaf=_is_structural_zero)
  what = f"regularizer gradient #{index}" if index else "regularizer gradient"
  aligned, position = [], 0
  for k, (path, empirical_leaf) in enumerate(zip(empirical_paths, empirical_leaves)):
    masked_out = _is_masked(empirical_leaf)
    if position >= len(flat):
      if masked_out:
        continue
      raise ValueError(
          f"{name}: the {what} lacks the leaf {_keystr(path)} of the empirical "
          "gradient; pass None for leaves the regularizer does not touch."
      )
    reg_path, leaf = flat[position]
    if _is_structural_zero(leaf) and _under(path, reg_path):
      if not masked_out:
        aligned.append(None)
      if k + 1 == len(empirical_paths) or not _under(empirical_paths[k + 1], reg_path):
        position += 1  # the zero subtree ends here
      continue
    if masked_out:
      # Another branch of masked/multi_transform owns these leaves: skip the regularizer's subtree there.
      end = position
      while end < len(flat) and _under(flat[end][0], path):
        end += 1
      if end > position:
        position = end
        continue
    if reg_path != path:
      raise ValueError(
          f"{name}: the {what} and the empirical gradient differ in structure: "
          f"the first differing path is {_keystr(path)} in the empirical gradient "
          f"vs {_keystr(reg_path)} in the {what}. Compute both with respect to the "
          "same parameters (use None for untouched leaves)."
      )
    if jnp.shape(leaf) != jnp.shape(empirical_leaf):
      raise ValueError(
          f"{name}: leaf {_keystr(path)} has shape {jnp.shape(leaf)} in the {what} "
          f"but {jnp.shape(empirical_leaf)} in the empirical gradient."
      )
    aligned.append(leaf)
    position += 1
  if position < len(flat):
    raise ValueError(
        f"{name}: the {what} has a leaf at {_keystr(flat[position][0])} that the empirical "
        "gradient lacks; both must have the structure of the parameters."
    )
  return aligned


_FORMS = (
    "call tx.update(empirical_grad, state, params, regularizer_grads=regularizer_grad) "
    "or pass the tuple (empirical_grad, regularizer_grad, ...) as updates"
)


def _split_updates(updates, params, name="dtnh"):
  """The tuple form: ``updates == (g, r_1, ..., r_k)``."""
  if not isinstance(updates, (tuple, list)) or len(updates) < 2:
    raise TypeError(
        f"{name} got no regularizer gradient: {_FORMS}; got {type(updates).__name__}"
        + (f" of length {len(updates)}" if isinstance(updates, (tuple, list)) else "")
        + " and no regularizer_grads. For a step without regularizer, pass zeros as regularizer_grads."
    )
  if params is not None and jax.tree.structure(updates) == jax.tree.structure(params):
    raise TypeError(
        f"{name} got a single pytree shaped like the parameters and no regularizer_grads: "
        f"{_FORMS}. Compute the two gradients separately, e.g. with dtnh_jax.split_value_and_grad."
    )
  return updates[0], list(updates[1:])


def regularizer_list(regularizer_grads, empirical, num_weights: int, name: str = "dtnh") -> list:
  """The ``regularizer_grads=`` argument of :func:`dtnh`'s update as a list of pytrees, one per ``reg_weight``.

  With one weight it is a pytree (``(r,)`` is read as one regularizer too, unless
  the parameters are themselves a tuple); with several it is a tuple or list of
  that many pytrees. The weights, not the shape of the argument, decide, so a
  tuple-shaped parameter tree is never mistaken for several regularizers.
  :func:`~dtnh_jax.multi_steps` reads its own ``regularizer_grads=`` with it.

  Args:
    regularizer_grads: the argument as given.
    empirical: the empirical gradient (its being a tuple tells ``(r,)`` apart).
    num_weights: the number of ``reg_weight`` values.
    name: the transformation named in the messages.

  Returns:
    The regularizer gradients, a list of ``num_weights`` pytrees (a longer or
    shorter list when a sequence of another length was given for several
    weights: the caller compares).

  Raises:
    ValueError: a sequence of several pytrees for one weight, or a single
      pytree for several.
  """
  is_sequence = isinstance(regularizer_grads, (tuple, list))
  if num_weights == 1:
    if is_sequence and not isinstance(empirical, (tuple, list)):
      if len(regularizer_grads) != 1:
        raise ValueError(
            f"{name}: regularizer_grads holds {len(regularizer_grads)} regularizer gradients but there is "
            "1 reg_weight; give reg_weight a sequence with one weight per regularizer."
        )
      return [regularizer_grads[0]]
    return [regularizer_grads]
  if not is_sequence:
    raise ValueError(
        f"{name}: reg_weight has {num_weights} weights, so regularizer_grads must be a tuple of "
        f"{num_weights} pytrees (one per weight); got a single {type(regularizer_grads).__name__}."
    )
  return list(regularizer_grads)


def _both_forms(updates, params, regularizer_grads) -> bool:
  """Whether ``updates`` is the tuple ``(g, r, ...)`` although ``regularizer_grads`` is given too.

  It is when ``updates`` does not have the parameters' structure but its first
  element does (without params: the structure of the regularizer gradient, or
  of its first one when it is a tuple).
  """
  if not isinstance(updates, (tuple, list)) or len(updates) < 2:
    return False
  if params is not None:
    shapes = {jax.tree.structure(params)}
  else:
    shapes = {jax.tree.structure(regularizer_grads)}
    if isinstance(regularizer_grads, (tuple, list)) and regularizer_grads:
      shapes.add(jax.tree.structure(regularizer_grads[0]))
  return jax.tree.structure(updates) not in shapes and jax.tree.structure(updates[0]) in shapes


def _gradients_from_arguments(updates, params, regularizer_grads, num_weights: int,
                              name: str = "dtnh") -> tuple[PyTree, list]:
  """``(empirical, [regularizer, ...])`` from either calling form of :func:`dtnh`.

  Raises ``TypeError`` for both forms at once, or for neither.
  """
  if regularizer_grads is None:
    return _split_updates(updates, params, name)
  if _both_forms(updates, params, regularizer_grads):
    raise TypeError(
        f"{name} got both calling forms at once: updates is the tuple (empirical_grad, regularizer_grad, ...) "
        "and regularizer_grads is given too. Pass the empirical gradient alone as updates with "
        "regularizer_grads=..., or the tuple without regularizer_grads."
    )
  return updates, regularizer_list(regularizer_grads, updates, num_weights, name)


def _normalize_weights(reg_weight, name: str = "dtnh") -> tuple[list[ScalarOrSchedule], bool]:
  """The list of per-regularizer weights, and whether there is exactly one."""
  if callable(reg_weight):
    weights, single = [reg_weight], True
  elif isinstance(reg_weight, (list, tuple)):
    weights, single = list(reg_weight), False
  elif jnp.ndim(reg_weight) == 0:
    weights, single = [reg_weight], True
  elif jnp.ndim(reg_weight) == 1:
    weights, single = [reg_weight[i] for i in range(jnp.shape(reg_weight)[0])], False
  else:
    raise ValueError(f"{name}: reg_weight must be a scalar, a schedule or a sequence; "
                     f"got shape {jnp.shape(reg_weight)}")
  if not weights:
    raise ValueError(f"{name}: reg_weight is an empty sequence; give one weight per regularizer.")
  for index, weight in enumerate(weights):
    _check_weight(weight, None if single else index, name)
  return weights, single


def _check_weight(weight, index: int | None, name: str = "dtnh") -> None:
  """Refuses a concrete weight that is negative, NaN or infinite.

  Such a weight would be applied silently (a negative one turns the step
  against the regularizer, NaN or Inf poisons every update), so the run would
  be lost before anyone looks. Python, numpy and concrete jax scalars are all
  checked alike. Schedules and traced values (under ``jit``, e.g. injected
  hyperparameters) have no value yet, so they are left unchecked.
  """
  if callable(weight) or isinstance(weight, jax.core.Tracer):
    return
  where = "" if index is None else f" at reg_weight[{index}] (the weight of regularizer gradient #{index + 1})"
  try:
    value = np.asarray(weight)
  except (TypeError, ValueError):
    value = None
  if value is None or value.ndim != 0 or not (
      jnp.issubdtype(value.dtype, jnp.floating) or jnp.issubdtype(value.dtype, jnp.integer)
      or value.dtype == np.bool_):
    raise TypeError(f"{name}: reg_weight must hold real numbers or schedules; got {weight!r}{where}.")
  number = float(value)
  if not (np.isfinite(number) and number >= 0):
    raise ValueError(f"{name}: reg_weight must be >= 0 and finite, got {number}{where}.")


def _labels(granularity: Granularity, paths, tree, name: str = "dtnh") -> list[Hashable]:
  if isinstance(granularity, str):
    if granularity == "tree":
      return [0] * len(paths)
    if granularity == "leaf":
      return list(range(len(paths)))
    if granularity == "module":
      return [tuple(path[:-1]) for path in paths]
    raise ValueError(f"{name}: granularity must be one of {names.GRANULARITIES}, a label pytree or a function; "
                     f"got {granularity!r}.")
  labels = granularity(tree) if callable(granularity) else granularity
  return _leaves_like(labels, tree, "granularity labels", name)


def _leaves_like(prefix_tree, tree, what: str, name: str = "dtnh") -> list:
  """Leaves of a pytree matching ``tree``'s structure, one per leaf of ``tree``.

  ``optax.MaskedNode`` entries of ``tree`` (dtnh inside ``optax.masked``) take
  the value found at their place in ``prefix_tree``, which is then dropped: a
  label or mask pytree written for all the parameters also serves a branch.
  """
  entries, treedef = jax.tree.flatten(tree, is_leaf=_is_masked)
  try:
    values = treedef.flatten_up_to(jax.tree.map(lambda _, value: value, tree, prefix_tree, is_leaf=_is_masked))
  except ValueError as error:
    raise ValueError(f"{name}: the {what} must have the structure of the parameters: {error}") from None
  return [value for entry, value in zip(entries, values) if not _is_masked(entry)]


def _unprojected_flags(unprojected, tree, num_leaves, name: str = "dtnh") -> list[bool]:
  if unprojected is None:
    return [False] * num_leaves
  mask = unprojected(tree) if callable(unprojected) else unprojected
  return [bool(flag) for flag in _leaves_like(mask, tree, "unprojected mask", name)]


def dtnh(
    reg_weight: ScalarOrSchedule | Sequence[ScalarOrSchedule],
    *,
    granularity: Granularity = "tree",
    projection: str = "conflict",
    unprojected: PyTree | Callable[[PyTree], PyTree] | None = None,
    max_angle: float | jax.Array | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""DTNH: a descent direction that never slows the empirical loss down.

  Given the empirical gradient :math:`g = \nabla J(\omega)` and the regularizer
  gradient :math:`r = \nabla \Omega(\omega, \omega_s)` (Algorithm 1 of Wan et al.)

  .. math::

    d = \begin{cases}
      g + \lambda r & \text{if } \langle g, r\rangle \ge 0 \\
      g + \lambda \left(r - \frac{\langle g, r\rangle}{\|g\|^2} g\right) & \text{otherwise,}
    \end{cases}

  so :math:`\langle d, g\rangle \ge \|g\|^2` and :math:`\langle d - g, r\rangle \ge 0`.
  Chain it before the optimizer, which then sees :math:`d` as the gradient.
  Inner products accumulate in float32 (or wider); each leaf of ``d`` keeps the
  dtype of the empirical gradient's leaf.

  Two calling forms give the same numbers. The extra-args form works anywhere
  in a chain, inside optax's wrappers and under Flax NNX, because
  ``optax.chain`` (and ``masked``, ``multi_transform``, ``inject_hyperparams``,
  ``apply_if_finite``, ``MultiSteps``) pass extra keyword arguments on to
  every member that takes them::

    updates, state = tx.update(g, state, params, regularizer_grads=r)   # r, or (r_1, ..., r_k)
    updates, state = tx.update((g, r), state, params)                  # tuple: dtnh first in the chain

  Later in a chain, dtnh projects the empirical gradient that the earlier
  members return (e.g. clipped) and uses ``regularizer_grads`` as given. A
  gradient alone, without ``regularizer_grads``, raises ``TypeError`` instead
  of meaning "no regularizer this step": a wrapper or training loop that drops
  the keyword would otherwise turn a DTNH run into plain fine-tuning without
  a trace. For a step without regularizer, pass zeros (``d = g``) or make
  ``reg_weight`` 0. Both forms at once raise ``TypeError`` as well.

  What the inner products run over: the leaves dtnh is given. Inside
  ``optax.masked(dtnh(...), mask)`` or one branch of ``optax.multi_transform``,
  the other leaves arrive as ``optax.MaskedNode``; dtnh passes them through and
  drops the regularizer gradient there (with or without
  ``mask_compatible_extra_args``), so it projects over that branch alone;
  ``granularity`` and ``unprojected`` pytrees written for all the parameters
  still fit. Placed *before* a ``multi_transform`` whose frozen branch is
  ``optax.set_to_zero()``, dtnh also counts the frozen leaves, which never
  move; to project over the trained parameters only (the paper's vector), mask
  it: ``optax.chain(optax.masked(dtnh(λ), trainable), optax.multi_transform(...))``.
  These wrappers map their mask over ``updates``, so only the extra-args form
  fits inside them.

  Gradient accumulation: ``optax.MultiSteps`` averages ``updates`` only and
  forwards ``regularizer_grads`` unaveraged, so it pairs the mean empirical
  gradient with the last micro-batch's regularizer gradient. That is exact
  for regularizers of the parameters alone (L2, L2-SP) and wrong for
  batch-dependent ones (KnowDist, DELTA); :func:`dtnh_jax.multi_steps`
  averages both and projects the means.

  Non-finite gradients: NaN or Inf in either gradient is not masked; it reaches
  ``d``, so the usual checks see it. To skip such steps, wrap the optimizer
  *after* dtnh, which checks ``d`` and so both gradients::

    optax.chain(dtnh_jax.dtnh(0.1),
                optax.apply_if_finite(optax.sgd(0.1, momentum=0.9), max_consecutive_errors=3))

  A skipped step then leaves the parameters and the optimizer's state alone,
  but dtnh's own step count (which drives ``reg_weight`` schedules) still
  advances and its diagnostics describe the non-finite gradients.
  ``apply_if_finite`` around the whole chain checks only the ``updates`` it is
  given: in the extra-args form the empirical gradient alone (a NaN in
  ``regularizer_grads`` is applied); in the tuple form it raises a
  ``TypeError`` from ``lax.cond`` ("branch outputs must have the same pytree
  structure"), as a rejected step returns zeros shaped like the ``(g, r)``
  tuple and an accepted one the single tree ``d``.

  Args:
    reg_weight: :math:`\lambda`, a float or an ``optax`` schedule of the step
      count (the paper decays it per epoch); for several regularizers, a
      sequence (or 1-D array) with one weight or schedule each, and
      ``regularizer_grads`` a tuple with one gradient per weight (with a single
      weight it is one pytree, even if the parameters are a tuple). Concrete
      weights (Python, numpy or jax scalars) that are negative, NaN or infinite
      raise ``ValueError``, as a negative one would turn the step against the
      regularizer and a non-finite one would spoil every update; this holds
      for ``optax.inject_hyperparams`` too whenever it runs eagerly. The values
      of schedules and of traced weights (e.g. injected hyperparameters under
      ``jit``) are not known here and are applied as given: a negative
      :math:`\lambda` is used as is, moving the parameters against the
      regularizer, and a NaN or Inf one makes all of ``d`` non-finite (which
      ``apply_if_finite`` then skips). ``diagnostics.reg_weight`` shows the
      value used at each step.
    granularity: over which parameters each projection is computed:
      ``"tree"`` (the paper: one projection over the whole vector), ``"leaf"``
      (each parameter tensor on its own, as in the authors' released code),
      ``"module"`` (leaves sharing a parent path, e.g. one group per layer),
      a pytree of hashable labels with the parameters' structure, or a
      function from the parameters to such a pytree.
    projection: ``"conflict"`` projects only when :math:`\langle g, r\rangle < 0`
      (the paper); ``"always"`` removes the component along :math:`g` in every
      step (the authors' released code); ``"none"`` never projects: ``d = g + λ r``,
      the plain regularized gradient, with the same diagnostics (the baseline
      a DTNH run is compared with).
    unprojected: a pytree of booleans (or a function of the parameters giving
      one); True leaves are never projected (``d = g + λ r`` there) and take
      no part in the groups' inner products (the released code skips the new
      classifier head this way).
    max_angle: ``None`` (default) for Algorithm 1. A number ``s`` of degrees
      in [0, 180] solves the paper's Eq. 5 exactly instead: per group, the
      direction of the plane of :math:`g` and :math:`R = \sum_i \lambda_i r_i`
      with the smallest angle to :math:`g` subject to :math:`\angle(d, R) \le s`:
      :math:`\hat g` when :math:`\angle(g, R) \le s`, else the direction at
      exactly ``s`` from :math:`R` towards :math:`g`
      (:func:`~dtnh_jax.projection.max_angle_scales`). Eq. 5 fixes a direction
      only; ``d`` keeps the length of the direction Algorithm 1 gives with the
      same ``projection`` (``"none"``: :math:`|g + R|`), so a learning rate and
      ``λ`` schedule tuned for ``dtnh`` keep their meaning. Against Algorithm 1,
      ``s = 90``: both never point against :math:`g`, and where
      :math:`\langle g, R\rangle < 0` both stay in the plane of g and R and have
      the same length; but Eq. 5 there takes :math:`g` minus its component along
      :math:`R` (so :math:`\angle(d, R) = 90°` exactly and :math:`\angle(d, g)`
      is the smallest possible), while Algorithm 1 takes :math:`r` minus its
      component along :math:`g` (so :math:`\langle d, g\rangle = |g|^2` and
      :math:`\angle(d, R)` may exceed 90°); and where they do not conflict Eq. 5
      steps along :math:`g` alone (it keeps the regularizer only as a
      constraint) while Algorithm 1 steps along :math:`g + R`. ``s = 180`` is
      :math:`g` rescaled; ``s = 0`` follows :math:`R`. Traced values (e.g.
      ``optax.inject_hyperparams``) are fine; concrete ones outside [0, 180]
      raise ``ValueError``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update(g, state,
    params=None, *, regularizer_grads=r, **extra_args)`` (or ``update((g, r_1,
    ..., r_k), state, params=None, **extra_args)``) returns ``(d, state)``;
    other extra arguments are ignored. A regularizer gradient may hold ``None``
    (or ``optax.MaskedNode()``) for leaves it does not touch.
    ``state.diagnostics`` holds :class:`~dtnh_jax.Diagnostics`.

  Raises:
    TypeError: at ``update``, for a gradient without regularizer gradient, or
      for both calling forms at once.
    ValueError: at ``update``, for regularizer gradients whose number differs
      from that of the weights or whose structure or shapes differ from the
      empirical gradient's; here, for the bad options above.

  Example::

    tx = optax.chain(dtnh_jax.dtnh(reg_weight=0.01),
                     optax.sgd(learning_rate=0.01, momentum=0.9))
    updates, opt_state = tx.update(g_emp, opt_state, params, regularizer_grads=g_reg)
    updates, opt_state = tx.update((g_emp, g_reg), opt_state, params)   # the same, dtnh first
    print(opt_state[0].diagnostics.angle1)   # or optax.tree.get(opt_state, "diagnostics")

    # Flax NNX: nnx.Optimizer passes keyword arguments on to tx.update.
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    optimizer.update(model, nnx.grad(loss)(model, batch), regularizer_grads=nnx.grad(reg)(model))

  References:
    Wan, Xiong, Li, Zhu, Huan, `Towards Making Deep Transfer Learning Never
    Hurt <https://arxiv.org/abs/1911.07489>`_, ICDM 2019.
  """
  _normalize_weights(reg_weight)   # refuses bad weights before the other options, as it always has
  if projection not in names.PROJECTIONS:
    raise ValueError(f"dtnh: projection must be one of {names.PROJECTIONS}, got {projection!r}.")
  if max_angle is not None:
    _check_angle(max_angle)

  def init_state(params, num_regularizers, single):
    del params
    return DTNHState(count=jnp.zeros([], jnp.int32), diagnostics=Diagnostics.zeros(num_regularizers, single))

  def direction(empirical_leaves, regularizer_leaves, reg_weights, grouping, single, state):
    direction_leaves, diagnostics = projection_lib.project(
        empirical_leaves, regularizer_leaves, reg_weights, grouping, projection, single, max_angle
    )
    return direction_leaves, DTNHState(count=state.count, diagnostics=diagnostics)

  return gram_transformation("dtnh", reg_weight, granularity=granularity, unprojected=unprojected,
                             init_state=init_state, direction=direction)


def _check_angle(max_angle) -> None:
  """Refuses a concrete ``max_angle`` outside [0, 180] degrees (traced ones are applied as given)."""
  if isinstance(max_angle, jax.core.Tracer):
    return
  try:
    value = float(np.asarray(max_angle))
  except (TypeError, ValueError):
    raise TypeError(f"dtnh: max_angle must be a number of degrees or None; got {max_angle!r}.") from None
  if not 0 <= value <= 180:
    raise ValueError(f"dtnh: max_angle must be in [0, 180] degrees, got {value}.")


def gram_transformation(
    name: str,
    reg_weight: ScalarOrSchedule | Sequence[ScalarOrSchedule],
    *,
    granularity: Granularity,
    unprojected: PyTree | Callable[[PyTree], PyTree] | None,
    init_state: Callable[[PyTree, int, bool], NamedTuple],
    direction: Callable[..., tuple[list[jax.Array], NamedTuple]],
) -> optax.GradientTransformationExtraArgs:
  """The optax plumbing that :func:`dtnh` and every ``dtnh_jax.aggregators`` correction share.

  Both calling forms, ``None``/``MaskedNode`` regularizer leaves, the
  grouping, ``reg_weight`` schedules and the step count live here once; a
  correction is only its ``direction``.

  Args:
    name: the correction's name in error messages.
    reg_weight: as for :func:`dtnh` (checked here).
    granularity: as for :func:`dtnh`.
    unprojected: as for :func:`dtnh`.
    init_state: ``(params, num_regularizers, single) -> state``, a NamedTuple
      with a ``count`` field (and ``diagnostics``, by convention).
    direction: ``(empirical_leaves, regularizer_leaves, reg_weights, grouping,
      single, state) -> (direction_leaves, state)``; ``reg_weights`` is the
      float32 ``λ`` of this step, the returned state's count is advanced here.
  """
  weights, single = _normalize_weights(reg_weight, name)

  def init_fn(params):
    return init_state(params, len(weights), single)

  def update_fn(updates, state, params=None, *, regularizer_grads=None, **extra_args):
    del extra_args
    empirical, regularizers = _gradients_from_arguments(updates, params, regularizer_grads, len(weights), name)
    if len(regularizers) != len(weights):
      raise ValueError(
          f"{name}: got {len(regularizers)} regularizer gradient(s) but {len(weights)} "
          "reg_weight(s); give one weight per regularizer."
      )
    # MaskedNode entries (inside optax.masked) stay in the tree and take no part in the projection.
    flat, treedef = jax.tree_util.tree_flatten_with_path(empirical, is_leaf=_is_masked)
    paths = [path for path, _ in flat]
    entries = [leaf for _, leaf in flat]
    empirical_leaves = [leaf for leaf in entries if not _is_masked(leaf)]
    regularizer_leaves = [
        flatten_regularizer(paths, entries, reg, i + 1 if len(regularizers) > 1 else 0, name)
        for i, reg in enumerate(regularizers)
    ]
    tree_for_labels = empirical if params is None else params
    grouping = projection_groups(tree_for_labels, granularity, unprojected, name)
    reg_weights = jnp.stack([
        jnp.asarray(w(state.count) if callable(w) else w, jnp.float32) for w in weights
    ])
    direction_leaves, new_state = direction(empirical_leaves, regularizer_leaves, reg_weights, grouping, single, state)
    computed = iter(direction_leaves)
    updates = jax.tree_util.tree_unflatten(
        treedef, [leaf if _is_masked(leaf) else next(computed) for leaf in entries])
    return updates, new_state._replace(count=optax.safe_increment(state.count))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def projection_groups(tree: PyTree, granularity: Granularity = "tree", unprojected=None,
                      name: str = "dtnh") -> projection_lib.Grouping:
  """The :class:`~dtnh_jax.projection.Grouping` that :func:`dtnh` uses for ``tree``.

  Handy to check which parameters share a projection before training.
  """
  paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
  labels = _labels(granularity, paths, tree, name)
  flags = _unprojected_flags(unprojected, tree, len(paths), name)
  return projection_lib.group_leaves(labels, flags)
