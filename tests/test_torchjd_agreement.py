"""The gradient-surgery corrections against TorchJD's aggregators (torchjd 0.18.0, float64), row by row.

Each correction here runs end to end (``update`` on a pytree, float32, λ = 1
so that the rows ``[g, λ r_1, ...]`` are the Jacobian's rows in order) and
is compared with the TorchJD aggregator of the same Jacobian. Conventions
that differ, and how each comparison bridges them:

- PCGrad, GradVac: TorchJD visits the other rows in a random order
  (``torch.randperm``); here in index order. ``torch.randperm`` is patched to
  return the identity. GradVac's ``eps`` is relative to the Gram matrix's
  trace here, absolute in TorchJD (1e-8: no difference at these sizes).
- UPGrad, DualProj: TorchJD's default preference vector averages
  (``1/m``); here the rows are summed, TorchJD's ``pref_vector=ones``, which
  is compared (and the default times ``m``). TorchJD adds ``reg_eps=1e-4`` to
  the trace-normalized Gram matrix; here the default is 0: compared with
  ``reg_eps=1e-4`` on both sides, and the exact default with TorchJD's
  projector at ``reg_eps=1e-11``.
- MGDA: the same scale (convex weights); TorchJD's Frank-Wolfe is
  approximate, so the check is the min-norm certificate: ours is no longer
  than TorchJD's, and ``|ours - torchjd|² <= |torchjd|² - |ours|²`` (which
  holds for the exact min-norm point against any point of the hull).
- CAGrad: TorchJD (and the paper) centre the ball on the rows' mean; here on
  their sum: ours equals TorchJD's times ``m``. Where the rows are
  Pareto-stationary and their sum conflicts with none (a zero row), TorchJD
  returns 0 and ours the sum (tested apart).

Tolerances (absolute, relative to the largest entry of the Jacobian; float32
here against float64 there), worst seen on these cases in brackets:
PCGrad 1e-5 [2e-7]; GradVac 1e-4 [3e-6]; UPGrad and DualProj 1e-4 [5e-7 at
reg_eps=1e-4, 4e-6 exact], 1e-3 for nearly opposite rows, whose dual-cone
QP is ill-conditioned [7e-6, 7e-5 exact]; MGDA: the certificate to 1e-6 of
the squared scale [7e-8], two rows 1e-5 [6e-8]; CAGrad 2e-3 [1e-3], our
inner objective no worse than that of TorchJD's Clarabel solution (whose
weights are themselves only accurate to ~2e-4: our float64 run differs
from it by that much).
"""

import functools
import importlib.metadata
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dtnh_jax import aggregators

torch = pytest.importorskip("torch")
torchjd = pytest.importorskip("torchjd")
from torchjd import aggregation as tjd  # noqa: E402

TORCHJD_VERSION = importlib.metadata.version("torchjd")


def test_the_tested_torchjd_is_the_pinned_one():
  assert TORCHJD_VERSION.startswith("0.18"), f"conventions above were read from torchjd 0.18, found {TORCHJD_VERSION}"


def jacobians():
  """(name, J): 2-4 rows, random, nearly parallel, nearly and exactly opposite, zero, ill-conditioned."""
  rng = np.random.default_rng(2024)
  cases = []
  for m in (2, 3, 4):
    for seed in range(3):
      n = int(rng.integers(m, 9))
      base = rng.normal(size=(m, n))
      cases.append((f"random-{m}-{seed}", base.copy()))
      near_parallel = base.copy()
      near_parallel[1] = base[0] * rng.uniform(0.2, 3) + 0.02 * rng.normal(size=n)
      cases.append((f"near-parallel-{m}-{seed}", near_parallel))
      near_opposite = base.copy()
      near_opposite[1] = -base[0] * rng.uniform(0.2, 3) + 0.02 * rng.normal(size=n)
      cases.append((f"near-opposite-{m}-{seed}", near_opposite))
      ill = base * np.logspace(0, -2.5, m)[:, None]
      cases.append((f"ill-conditioned-{m}-{seed}", ill))
    opposite = rng.normal(size=(m, 5))
    opposite[1] = -1.7 * opposite[0]
    cases.append((f"opposite-{m}", opposite))
    zero = rng.normal(size=(m, 5))
    zero[-1] = 0
    cases.append((f"zero-row-{m}", zero))
  return cases


CASES = jacobians()
IDS = [name for name, _ in CASES]


def _correction(name, k, options):
  return getattr(aggregators, name)(1.0 if k == 1 else [1.0] * k, **options)


@functools.partial(jax.jit, static_argnames="name")
def _jitted_update(name, rows, state, options):
  """``update`` of the correction ``name``, its ``options`` traced: one program per shape for every value."""
  return _correction(name, len(rows) - 1, options).update(rows, state, rows[0])


#: Every Jacobian's rows are given to ours in this many columns, zeros appended (the cases have 3 to 8).
WIDTH = 8


def ours(name, jacobian, state=None, **options):
  """Our correction of the rows of ``jacobian`` (λ = 1), float32, and its state.

  Jitted (:func:`_jitted_update`), with the rows zero-padded to ``WIDTH`` columns: the same vectors in a larger
  space (the same Gram matrix, the same direction with zeros appended, which is checked). So each correction
  compiles one program per number of rows, where its ops dispatched one by one compiled ~1 s of small programs per
  shape: most of this file's time.
  """
  width = jacobian.shape[1]
  assert width <= WIDTH
  rows = tuple({"v": jnp.asarray(np.pad(row, (0, WIDTH - width)), jnp.float32)} for row in jacobian)
  state = _correction(name, len(rows) - 1, options).init(rows[0]) if state is None else state
  direction, state = _jitted_update(name, rows, state, options)
  direction = np.asarray(direction["v"], np.float64)
  np.testing.assert_array_equal(direction[width:], 0)
  return direction[:width], state


def theirs(aggregator, jacobian):
  with mock.patch("torch.randperm", lambda n, **kwargs: torch.arange(n)):
    return aggregator(torch.tensor(jacobian, dtype=torch.float64)).numpy()


def scale(jacobian):
  return np.abs(jacobian).max()


@pytest.mark.parametrize("jacobian", [j for _, j in CASES], ids=IDS)
def test_pcgrad_agrees(jacobian):
  np.testing.assert_allclose(ours("pcgrad", jacobian)[0], theirs(tjd.PCGrad(), jacobian), atol=1e-5 * scale(jacobian))


@pytest.mark.parametrize("m", [2, 3, 4])
def test_gradvac_agrees_over_several_steps_of_its_moving_average(m):
  rng = np.random.default_rng(m)
  theirs_gradvac, state = tjd.GradVac(beta=0.3), None
  for step in range(5):
    jacobian = rng.normal(size=(m, 6))
    if step % 2:
      jacobian[1] = -0.8 * jacobian[0] + 0.1 * rng.normal(size=6)
    direction, state = ours("gradvac", jacobian, state, beta=0.3)
    np.testing.assert_allclose(direction, theirs(theirs_gradvac, jacobian), atol=1e-4 * scale(jacobian))


@pytest.mark.parametrize("jacobian", [j for _, j in CASES], ids=IDS)
def test_mgda_is_the_min_norm_point_torchjds_frank_wolfe_approaches(jacobian):
  mine = ours("mgda", jacobian)[0]
  frank_wolfe = theirs(tjd.MGDA(epsilon=1e-10, max_iters=2000), jacobian)
  squared = scale(jacobian) ** 2
  gap = frank_wolfe @ frank_wolfe - mine @ mine
  assert gap >= -1e-6 * squared                                                   # no longer than TorchJD's
  assert np.sum((mine - frank_wolfe) ** 2) <= gap + 1e-6 * squared               # the min-norm certificate
  if len(jacobian) == 2:   # on a segment Frank-Wolfe's line search is exact
    np.testing.assert_allclose(mine, frank_wolfe, atol=1e-5 * scale(jacobian))


def _dual_cone_tolerance(name, jacobian):
  return (1e-3 if name.startswith("near-opposite") else 1e-4) * scale(jacobian)


@pytest.mark.parametrize("name,jacobian", CASES, ids=IDS)
def test_upgrad_agrees_with_torchjds_regularization(name, jacobian):
  pytest.importorskip("quadprog")
  m = len(jacobian)
  want = theirs(tjd.UPGrad(pref_vector=torch.ones(m, dtype=torch.float64)), jacobian)
  mine = ours("upgrad", jacobian, reg_eps=1e-4)[0]
  np.testing.assert_allclose(mine, want, atol=_dual_cone_tolerance(name, jacobian))
  # TorchJD's default averages: ours is m times it
  np.testing.assert_allclose(mine, m * theirs(tjd.UPGrad(), jacobian), atol=_dual_cone_tolerance(name, jacobian))


@pytest.mark.parametrize("name,jacobian", CASES, ids=IDS)
def test_dualproj_agrees_with_torchjds_regularization(name, jacobian):
  pytest.importorskip("quadprog")
  m = len(jacobian)
  want = theirs(tjd.DualProj(pref_vector=torch.ones(m, dtype=torch.float64)), jacobian)
  mine = ours("dualproj", jacobian, reg_eps=1e-4)[0]
  np.testing.assert_allclose(mine, want, atol=_dual_cone_tolerance(name, jacobian))
  np.testing.assert_allclose(mine, m * theirs(tjd.DualProj(), jacobian), atol=_dual_cone_tolerance(name, jacobian))


# Exact projections (our default) against TorchJD's solver with almost no regularization; quadprog needs a
# positive definite matrix, so only Jacobians of full row rank.
FULL_RANK = [(name, j) for name, j in CASES if not name.startswith(("opposite", "zero-row"))]


@pytest.mark.parametrize("name,jacobian", FULL_RANK, ids=[name for name, _ in FULL_RANK])
def test_exact_upgrad_and_dualproj_agree_with_torchjd_without_regularization(name, jacobian):
  pytest.importorskip("quadprog")
  from torchjd._linalg import QuadprogProjector
  ones = torch.ones(len(jacobian), dtype=torch.float64)
  projector = QuadprogProjector(reg_eps=1e-11)
  for correction, aggregator in (("upgrad", tjd.UPGrad(ones, projector)), ("dualproj", tjd.DualProj(ones, projector))):
    np.testing.assert_allclose(ours(correction, jacobian)[0], theirs(aggregator, jacobian),
                               atol=_dual_cone_tolerance(name, jacobian))


def _cagrad_objective(weights, gram, c):
  """TorchJD's CAGrad objective on the trace-normalized Gram matrix, for convex weights."""
  gram = gram / np.trace(gram)
  mean = np.full(len(gram), 1 / len(gram))
  return weights @ gram @ mean + c * np.sqrt(mean @ gram @ mean) * np.sqrt(max(weights @ gram @ weights, 0))


#: ``c`` traced: one compile per number of rows for the 117 cases.
_jitted_cagrad_weights = jax.jit(aggregators.cagrad_weights)

PARETO_STATIONARY_WITH_HARMLESS_SUM = ("zero-row",)
CAGRAD_CASES = [(name, j) for name, j in CASES if not name.startswith(PARETO_STATIONARY_WITH_HARMLESS_SUM)]


@pytest.mark.parametrize("c", [0.25, 0.5, 1.5])
@pytest.mark.parametrize("name,jacobian", CAGRAD_CASES, ids=[name for name, _ in CAGRAD_CASES])
def test_cagrad_agrees_up_to_torchjds_mean_convention(name, jacobian, c):
  pytest.importorskip("cvxpy")
  m = len(jacobian)
  mine = ours("cagrad", jacobian, c=c)[0]
  np.testing.assert_allclose(mine, m * theirs(tjd.CAGrad(c=c), jacobian), atol=2e-3 * scale(jacobian))
  # The weights of the inner problem: ours reach an objective at least as low as TorchJD's.
  gram = jacobian @ jacobian.T
  theirs_weights = tjd.CAGradWeighting(c=c)(torch.tensor(gram)).numpy() * m - 1
  our_weights = np.asarray(_jitted_cagrad_weights(jnp.asarray(gram, jnp.float32)[None], c)[0], np.float64) - 1
  if np.abs(theirs_weights).sum() > 1e-9 and our_weights.sum() > 1e-9:
    assert (_cagrad_objective(our_weights / our_weights.sum(), gram, c)
            <= _cagrad_objective(theirs_weights / theirs_weights.sum(), gram, c) + 1e-8)


def test_cagrad_with_a_zero_row_moves_along_the_sum_where_torchjd_stops():
  pytest.importorskip("cvxpy")
  jacobian = dict(CASES)["zero-row-2"]
  np.testing.assert_allclose(theirs(tjd.CAGrad(c=0.5), jacobian), 0, atol=1e-12)
  np.testing.assert_allclose(ours("cagrad", jacobian, c=0.5)[0], jacobian.sum(axis=0), rtol=1e-6)
