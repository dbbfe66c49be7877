"""The NaN/Inf guard inside the optimizer: a step whose update is not finite changes nothing.

The train step decides ``finite`` (a scalar) and hands it to the optimizer as an extra argument; every
transformation here then keeps its state when ``finite`` is false, and the last one emits a zero update. The
state is exactly that of the unguarded optimizer (``optax.sgd``, ``optax.adamw``), so checkpoints and the plain
methods' summed step read and write the same state.

Why not select the optimizer's outputs afterwards (``where(finite, new, old)`` on the parameters and on the
state)? Then the parameters' select needs the *unselected* new momentum while the state's select overwrites
the donated momentum buffer: XLA:CPU copies every momentum leaf first and recomputes the momentum inside the
parameter update (two more passes over parameter-sized arrays, which made DTNH(KnowDist) slower than the naive
step without a guard: benchmarks/RESULTS.md, the site's Results page). :func:`guarded_trace` selects the momentum
where it is formed and passes the selected one on, so the parameter update reads it, as it does without a guard.
"""

from __future__ import annotations

import optax

__all__ = ["guarded", "guarded_sgd", "guarded_trace"]


def guarded(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """``inner`` whose ``update(..., finite=...)`` keeps ``inner``'s state and emits zeros when ``finite`` is false.

  Any transformation; its state is ``inner``'s. ``finite`` is a boolean scalar (default: true).
  """

  def update_fn(updates, state, params=None, *, finite=True, **extra_args):
    del extra_args
    new_updates, new_state = inner.update(updates, state, params)
    return (optax.tree.where(finite, new_updates, optax.tree.zeros_like(new_updates)),
            optax.tree.where(finite, new_state, state))

  return optax.GradientTransformationExtraArgs(inner.init, update_fn)


def guarded_trace(decay: float) -> optax.GradientTransformationExtraArgs:
  """``optax.trace(decay)`` (heavy-ball momentum) that keeps its trace when ``finite`` is false.

  Its updates are the selected trace, not zeros: a transformation after it (:func:`guarded`) must zero the
  update, as :func:`guarded_sgd`'s learning-rate scaling does.
  """
  inner = optax.trace(decay=decay)

  def update_fn(updates, state, params=None, *, finite=True, **extra_args):
    del extra_args
    _, new_state = inner.update(updates, state, params)
    new_state = optax.tree.where(finite, new_state, state)
    return new_state.trace, new_state

  return optax.GradientTransformationExtraArgs(inner.init, update_fn)


def guarded_sgd(learning_rate: optax.ScalarOrSchedule, momentum: float | None = None
                ) -> optax.GradientTransformationExtraArgs:
  """``optax.sgd(learning_rate, momentum)`` with the guard: the same state, the same updates when ``finite``."""
  first = guarded_trace(momentum) if momentum is not None else optax.identity()
  return optax.chain(first, guarded(optax.scale_by_learning_rate(learning_rate)))

