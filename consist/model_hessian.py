"""A model Hessian of a molecule from its geometry alone: the initial Hessian of BFGS relaxation.

Lindh's model (R. Lindh, A. Bernhardsson, G. Karlström, P.-Å. Malmqvist, Chem. Phys. Lett. 241,
423 (1995)): a harmonic force field on every stretch, bend and torsion of the molecule, each weighted
by how bonded its atoms are,

    H = sum_q k_q b_q b_q^T,   b_q = d q / d x  (Cartesian gradient of the internal coordinate q),
    stretch ij:  k = k_r rho_ij,   bend ijk: k = k_b rho_ij rho_jk,   torsion ijkl: k = k_t rho_ij rho_jk rho_kl,
    rho_ij = exp(alpha_ij (r_ref,ij^2 - r_ij^2))   (bohr),

with k_r = 0.45 Eh/bohr^2, k_b = 0.15 Eh/rad^2, k_t = 0.005 Eh/rad^2 and alpha, r_ref tabulated by
the periods (1, 2, >= 3) of the two atoms (elements past period 3 use period 3's values). No bond
graph is needed: bonded atoms are those with large rho. Coordinates whose weight is below
`threshold` are dropped, as are bends within 5 degrees of linear and torsions through them (their
Cartesian gradients are ill-defined there). `eps` (eV/Å^2) on the diagonal keeps the six rigid
motions, which no internal coordinate sees, at a finite curvature.

Measured on the learned energy (docs/DEVLOG.md, session 5): BFGS from this Hessian reaches fmax 0.05
eV/Å in 12.6 steps on average over 64 test molecules, against 21 for BFGS or L-BFGS from 70 eV/Å^2
times the identity, 21 without the torsion terms and 51 without the bends. With eps = 0.2 its soft
torsions (k_t) send the first steps ~0.2 Å along torsions where the learned energy is flat, to
structures further from the GFN2-xTB minima than the MMFF94 start (session 6); `consist.relax`
uses eps = 5 eV/Å^2 (`RelaxSettings.lindh_shift`), a floor under those curvatures, which keeps the
steps and lands closer to the GFN2-xTB minima than FIRE (session 9).
"""

from __future__ import annotations

import numpy as np

BOHR = 0.529177210903  # Å
HARTREE = 27.211386245988  # eV
_ALPHA = np.array([[1.0, 0.3949, 0.3949], [0.3949, 0.28, 0.28], [0.3949, 0.28, 0.28]])
_R_REF = np.array([[1.35, 2.10, 2.53], [2.10, 2.87, 3.40], [2.53, 3.40, 3.40]])  # bohr
K_STRETCH = 0.45 * HARTREE / BOHR**2  # eV/Å^2
K_BEND = 0.15 * HARTREE  # eV/rad^2
K_TORSION = 0.005 * HARTREE  # eV/rad^2
_LINEAR = np.deg2rad(175.0)


def _period(atomic_numbers: np.ndarray) -> np.ndarray:
  z = np.asarray(atomic_numbers)
  return np.where(z <= 2, 0, np.where(z <= 10, 1, 2))


def bond_weights(atomic_numbers: np.ndarray, positions: np.ndarray) -> np.ndarray:
  """[n, n] Lindh's rho_ij (0 on the diagonal)."""
  x = np.asarray(positions, np.float64)
  r2 = np.sum((x[:, None] - x[None]) ** 2, axis=-1) / BOHR**2
  p = _period(atomic_numbers)
  rho = np.exp(_ALPHA[p[:, None], p[None]] * (_R_REF[p[:, None], p[None]] ** 2 - r2))
  np.fill_diagonal(rho, 0.0)
  return rho


def _bend_gradients(x: np.ndarray, i, j, k):
  """(angle [b], d angle / d x_i, x_j, x_k [b, 3]) of the bends i-j-k."""
  u, v = x[i] - x[j], x[k] - x[j]
  lu, lv = np.linalg.norm(u, axis=-1), np.linalg.norm(v, axis=-1)
  eu, ev = u / lu[:, None], v / lv[:, None]
  cos = np.clip(np.sum(eu * ev, axis=-1), -1.0, 1.0)
  sin = np.sqrt(np.maximum(1.0 - cos**2, 1e-12))
  gi = (cos[:, None] * eu - ev) / (lu * sin)[:, None]
  gk = (cos[:, None] * ev - eu) / (lv * sin)[:, None]
  return np.arccos(cos), gi, -(gi + gk), gk


def _torsion_gradients(x: np.ndarray, i, j, k, l):
  """d dihedral / d x_i, x_j, x_k, x_l [t, 3] of the torsions i-j-k-l (Blondel & Karplus, J. Comput.
  Chem. 17, 1132 (1996))."""
  f, g, h = x[i] - x[j], x[j] - x[k], x[l] - x[k]
  a, b = np.cross(f, g), np.cross(h, g)
  a2, b2 = np.sum(a * a, axis=-1)[:, None], np.sum(b * b, axis=-1)[:, None]
  lg = np.linalg.norm(g, axis=-1)[:, None]
  fg, hg = np.sum(f * g, axis=-1)[:, None], np.sum(h * g, axis=-1)[:, None]
  di = -lg * a / a2
  dl = lg * b / b2
  dj = lg * a / a2 + fg / (a2 * lg) * a - hg / (b2 * lg) * b
  dk = -lg * b / b2 - fg / (a2 * lg) * a + hg / (b2 * lg) * b
  return di, dj, dk, dl


def _torsion_candidates(near: np.ndarray) -> np.ndarray:
  """int [t, 4] (i, j, k, l): near[i, j], near[j, k] with j < k, near[k, l], i, j, k, l distinct."""
  n = near.shape[0]
  src, dst = np.nonzero(near)  # sorted by src: the neighbours of a are dst[start[a]:start[a + 1]]
  start = np.concatenate([[0], np.cumsum(np.bincount(src, minlength=n))])
  deg = np.diff(start)
  j, k = src[src < dst], dst[src < dst]

  def expand(rows, atom):  # each row once per neighbour of `atom` (a column of rows)
    count = deg[atom]
    rep = np.repeat(np.arange(len(rows)), count)
    offset = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
    return rows[rep], dst[start[atom][rep] + offset]

  rows, i = expand(np.stack([j, k], 1), j)
  rows = np.concatenate([i[:, None], rows], 1)  # (i, j, k)
  rows, l = expand(rows, rows[:, 2])
  t = np.concatenate([rows, l[:, None]], 1)
  ok = (t[:, 0] != t[:, 2]) & (t[:, 3] != t[:, 1]) & (t[:, 0] != t[:, 3])
  return t[ok]


def lindh_hessian(atomic_numbers: np.ndarray, positions: np.ndarray, *, threshold: float = 1e-2,
                  eps: float = 0.2) -> np.ndarray:
  """[3n, 3n] float64 model Hessian (eV/Å^2) of one molecule at `positions` (Å); see the module
  docstring. Symmetric positive definite (eigenvalues >= eps)."""
  x = np.asarray(positions, np.float64)
  n = x.shape[0]
  rho = bond_weights(atomic_numbers, x)
  rows, weights = [], []  # (atom indices [q, m], gradients [q, m, 3]), weights [q]

  ii, jj = np.nonzero(np.triu(rho > threshold, 1))
  if ii.size:
    u = x[ii] - x[jj]
    u /= np.linalg.norm(u, axis=-1, keepdims=True)
    rows.append((np.stack([ii, jj], 1), np.stack([u, -u], 1)))
    weights.append(K_STRETCH * rho[ii, jj])

  near = rho > threshold  # candidate neighbours (rho_ij rho_jk > threshold needs neither factor tiny)
  # bends i-j-k (i < k), j the apex
  j, i, k = np.nonzero(near[:, :, None] & near[:, None, :] & np.triu(np.ones((n, n), bool), 1)[None])
  w = rho[i, j] * rho[j, k]
  keep = w > threshold
  i, j, k, w = i[keep], j[keep], k[keep], w[keep]
  angle, gi, gj, gk = _bend_gradients(x, i, j, k)
  ok = angle < _LINEAR
  rows.append((np.stack([i, j, k], 1)[ok], np.stack([gi, gj, gk], 1)[ok]))
  weights.append(K_BEND * w[ok])

  # torsions i-j-k-l about the j-k axis (j < k: each torsion once), all four atoms distinct
  t = _torsion_candidates(near)
  if len(t):
    ti, tj, tk, tl = t.T
    w = rho[ti, tj] * rho[tj, tk] * rho[tk, tl]
    keep = ((w > threshold) & (_bend_gradients(x, ti, tj, tk)[0] < _LINEAR)
            & (_bend_gradients(x, tj, tk, tl)[0] < _LINEAR))
    if keep.any():
      t, w = t[keep], w[keep]
      rows.append((t, np.stack(_torsion_gradients(x, *t.T), 1)))
      weights.append(K_TORSION * w)

  # H = eps I + sum_q w_q b_q b_q^T, assembled from each coordinate's (3m)^2 outer product by
  # np.bincount: no BLAS call (a threaded BLAS on a machine whose cores are busy with XLA's threads
  # was measured 20-100x slower than this for these small matrices).
  flat, values = [], []
  for (atoms, grads), w in zip(rows, weights):
    if not len(w):
      continue
    q, m = atoms.shape
    cols = (3 * atoms[:, :, None] + np.arange(3)).reshape(q, 3 * m)
    g = grads.reshape(q, 3 * m)
    flat.append((cols[:, :, None] * (3 * n) + cols[:, None, :]).ravel())
    values.append((w[:, None, None] * g[:, :, None] * g[:, None, :]).ravel())
  hessian = np.bincount(np.concatenate(flat), np.concatenate(values), minlength=9 * n * n) if flat else np.zeros(9 * n * n)
  return hessian.reshape(3 * n, 3 * n) + eps * np.eye(3 * n)
