"""An independent plain-NumPy transcription of Algorithm 1 and the paper's angles.

Written from the paper (Eq. 6-7, Algorithm 1, Figures 4-5), in float64, on
explicit flat vectors: no code shared with ``dtnh_jax``.
"""

import numpy as np


def flat(leaves):
  return np.concatenate([np.asarray(x, np.float64).ravel() for x in leaves]) if leaves else np.zeros(0)


def dtnh_vectors(g, rs, lams, conflict_only=True):
  """Algorithm 1 on flat float64 vectors; several regularizers each projected on g."""
  d = g.copy()
  for r, lam in zip(rs, lams):
    inner = g @ r
    if (inner < 0 or not conflict_only) and g @ g > 0:
      r = r - inner / (g @ g) * g  # Eq. 6-7: keep the part orthogonal to g
    d = d + lam * r
  return d


def dtnh_groups(g_leaves, r_leaves_list, lams, groups, conflict_only=True, unprojected=()):
  """Algorithm 1 separately in each group of leaf indices; unprojected leaves get g + λ r."""
  out = [None] * len(g_leaves)
  for group in groups:
    g = flat([g_leaves[i] for i in group])
    rs = [flat([r[i] for i in group]) for r in r_leaves_list]
    d = dtnh_vectors(g, rs, lams, conflict_only)
    offset = 0
    for i in group:
      size = np.size(g_leaves[i])
      out[i] = d[offset:offset + size].reshape(np.shape(g_leaves[i]))
      offset += size
  for i in unprojected:
    out[i] = np.asarray(g_leaves[i], np.float64) + sum(
        lam * np.asarray(r[i], np.float64) for r, lam in zip(r_leaves_list, lams))
  return out


def angle_degrees(x, y):
  nx, ny = np.linalg.norm(x), np.linalg.norm(y)
  if nx == 0 or ny == 0:
    return 90.0
  return float(np.degrees(np.arccos(np.clip(x @ y / (nx * ny), -1, 1))))
