"""The gradient-surgery family as optax transformations with ``dtnh``'s update contract.

Each correction takes the same inputs as :func:`dtnh_jax.dtnh` (the tuple
``(g, r_1, ..., r_k)`` or ``g`` with ``regularizer_grads=``; ``reg_weight``
floats or schedules; ``granularity``; ``unprojected``), treats, per group, the
rows ``[g, λ_1 r_1, ..., λ_k r_k]`` as the Jacobian of a multi-objective
problem, and returns a direction computed from their Gram matrix alone, with
DTNH's :class:`~dtnh_jax.Diagnostics` of that direction in its state:

- :func:`pcgrad`: each row projected off the rows it conflicts with, summed;
- :func:`gradvac`: each row pulled to a moving-average target cosine, summed;
- :func:`mgda`: the min-norm point of the rows' convex hull;
- :func:`upgrad`: each row projected onto the rows' dual cone, summed;
- :func:`dualproj`: the rows' sum projected onto their dual cone;
- :func:`cagrad`: the best worst-case direction in a ball around the sum.

All but MGDA give ``g + Σ λ_i r_i`` when no two rows conflict (CAGrad: for
``c = 0``), as DTNH does. ``*_weights`` are the same math on a stack of Gram
matrices ``[groups, m, m]``, returning the rows' weights ``[groups, m]``.
"""

from dtnh_jax import names
from dtnh_jax.aggregators._cagrad import cagrad, cagrad_weights
from dtnh_jax.aggregators._dualproj import dualproj, dualproj_weights
from dtnh_jax.aggregators._gradvac import GradVacState, gradvac, gradvac_weights
from dtnh_jax.aggregators._gram import AggregatorState
from dtnh_jax.aggregators._mgda import mgda, mgda_weights
from dtnh_jax.aggregators._pcgrad import pcgrad, pcgrad_weights
from dtnh_jax.aggregators._upgrad import upgrad, upgrad_weights

__all__ = [
    "AGGREGATORS",
    "AggregatorState",
    "cagrad",
    "cagrad_weights",
    "dualproj",
    "dualproj_weights",
    "gradvac",
    "gradvac_weights",
    "GradVacState",
    "mgda",
    "mgda_weights",
    "pcgrad",
    "pcgrad_weights",
    "upgrad",
    "upgrad_weights",
]

#: The corrections' names, each the name of its factory here (``getattr(dtnh_jax.aggregators, name)``).
AGGREGATORS = names.AGGREGATORS
