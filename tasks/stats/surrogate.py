"""Projected-normal surrogate of a set of unit embeddings: the selection test's null
when the user gives no reference set.

Model: u = x / |x| with x ~ N(mu, Sigma) in R^D (the projected normal, PN). It is the
distribution of a smooth unimodal (or, with mu = 0, antipodally bimodal) density on
the sphere, and it is the exact law of the isotropic and anisotropic worlds of
docs/study.md.

Why not simply the mean and covariance of the unit rows (the first version did
that): projecting squeezes anisotropy, so N(mean(u), cov(u)) projected again is far
*less* peaked than the data, and the selected worst case of the data then looks
extreme against it (type-I error 1.0 on an anisotropic Gaussian, docs/study.md).
The fit here is the maximum-likelihood PN, by EM with the radius r = |x| as the
missing datum (Presnell, Morrison & Littell 1998 give the same E-step for D = 2):

  given u, p(r | u) ∝ r^(D-1) exp(-a r^2 / 2 + b r),  a = u'P u,  b = u'P mu,  P = Sigma^-1
  M-step: mu = mean(E[r|u] u),  Sigma = mean(E[r^2|u] u u') - mu mu'

(mu, Sigma) and (c mu, c^2 Sigma) give the same law; each step rescales to tr(Sigma) = D.

Plug-in bias. The selection statistic is the densest ball, so any *spurious* peak in
the fitted law makes the null's worst cases denser than the truth's and the test
conservative (the first version rejected 0 of 200 isotropic replicates, power gone
with it). Two sources, each corrected in its standard way:
  * the estimated mean adds about D/n to |mu|^2 (Mahalanobis): positive-part
    James-Stein shrinkage of mu towards 0 removes that on average;
  * sample-covariance eigenvalues spread around the truth (Marchenko-Pastur):
    Ledoit-Wolf shrinkage of Sigma towards a multiple of I, with the intensity
    estimated on the completed rows sqrt(E[r^2|u]) u.
Both shrinkages vanish as n grows for a fixed truth. Type-I error measured, not
assumed: docs/study.md.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_NODES = 161   # quadrature nodes per row


def _grid(beta: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes t (rows, _NODES) for integrals of t^n exp(-t^2/2 + beta t) over t > 0, and log-spacing h.

    The nodes are uniform in s = log t: the integrand times the Jacobian t is then
    smooth and decays at both ends (like t^(n+1) to the left, doubly exponentially to
    the right), where the trapezoid rule converges geometrically. In s the mode solves
    t^2 - beta t - (n + 1) = 0 and the curvature there is t^2 + n + 1.
    """
    t_m = 0.5 * (beta + np.sqrt(beta * beta + 4.0 * (n + 1)))
    s_m = np.log(t_m)
    sd = 1.0 / np.sqrt(t_m * t_m + n + 1)
    # Right of the mode the log-integrand g(s) = (n+1) s - e^(2s)/2 + beta e^s is more
    # concave than at the mode, so 10 sds drop it by over e^-50. To the left g only rises
    # (g' > 0 below the mode) but can flatten: take the first of 10 sd * 2^(k/2) where
    # the drop reaches 40, so everything further left is below e^-40 of the peak.
    g = lambda s: (n + 1) * s - 0.5 * np.exp(2 * s) + beta[..., None] * np.exp(s)  # noqa: E731
    cand = 10.0 * sd[:, None] * 2.0 ** (np.arange(17) / 2.0)[None, :]
    ok = g(s_m[:, None]) - g(s_m[:, None] - cand) >= 40.0
    left = cand[np.arange(len(sd)), np.where(ok.any(axis=1), ok.argmax(axis=1), cand.shape[1] - 1)]
    right = 10.0 * sd
    u = np.linspace(0.0, 1.0, _NODES)
    s = s_m[:, None] - left[:, None] + (left + right)[:, None] * u[None, :]
    return np.exp(s), (left + right) / (_NODES - 1)


def _log_integrand(t: np.ndarray, beta: np.ndarray, n: int) -> np.ndarray:
    """log of t^(n+1) exp(-t^2/2 + beta t): the integrand in s = log t (Jacobian included)."""
    return (n + 1) * np.log(t) - 0.5 * t * t + beta[:, None] * t


def _radius_moments(beta: np.ndarray, n: int) -> np.ndarray:
    """E[t] for the density ∝ t^n exp(-t^2/2 + beta t) on t > 0 (n = D - 1), by quadrature (1e-7 relative, tested)."""
    t, _ = _grid(beta, n)
    logf = _log_integrand(t, beta, n)
    w = np.exp(logf - logf.max(axis=1, keepdims=True))
    return (w * t).sum(axis=1) / w.sum(axis=1)


def _a_beta(U: np.ndarray, mu: np.ndarray, P: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: a = u'P u and beta = u'P mu / sqrt(a), the radius posterior's two numbers."""
    UP = U @ P
    a = np.einsum("ij,ij->i", UP, U)
    return a, (UP @ mu) / np.sqrt(a)


def _posterior_r(U: np.ndarray, mu: np.ndarray, P: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """E[r | u] and E[r^2 | u] under PN(mu, P^-1) for every row of U."""
    D = U.shape[1]
    a, beta = _a_beta(U, mu, P)
    sa = np.sqrt(a)
    et = _radius_moments(beta, D - 1)
    et2 = beta * et + D                    # I_{n+2} = beta I_{n+1} + (n+1) I_n, n = D - 1
    return et / sa, et2 / a


def _log_likelihood(U: np.ndarray, mu: np.ndarray, Sigma: np.ndarray) -> float:
    """Mean log-density of the rows under PN(mu, Sigma), up to a constant (for the convergence check)."""
    D = U.shape[1]
    P = np.linalg.inv(Sigma)
    a, beta = _a_beta(U, mu, P)
    c = -0.5 * float(mu @ P @ mu) - 0.5 * np.linalg.slogdet(Sigma)[1]
    # log I_{D-1}(beta), by the same quadrature (its scale-free part is all the check needs).
    t, h = _grid(beta, D - 1)
    logf = _log_integrand(t, beta, D - 1)
    mx = logf.max(axis=1)
    logI = mx + np.log(np.exp(logf - mx[:, None]).sum(axis=1) * h)
    return float(np.mean(logI - 0.5 * D * np.log(a)) + c)


@dataclass
class ProjectedNormal:
    """PN(mu, Sigma): draw x ~ N(mu, Sigma) and return x / |x| (float32 rows)."""
    mu: np.ndarray
    Sigma: np.ndarray
    shrink_mean: float = 0.0        # James-Stein factor applied to the ML mean (1 = mean set to 0)
    shrink_cov: float = 0.0         # Ledoit-Wolf intensity applied to the ML covariance
    iterations: int = 0
    n_fit: int = 0
    ml: tuple | None = None         # (mu, Sigma) before the corrections: a warm start for refits

    def __post_init__(self):
        self._L = np.linalg.cholesky(self.Sigma).T.astype(np.float32)
        self._mu = self.mu.astype(np.float32)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """n unit rows drawn with `rng` (float32: the null is drawn 1e7 rows at a time at paper scale)."""
        x = rng.standard_normal((n, len(self.mu)), dtype=np.float32) @ self._L
        x += self._mu
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x

    def describe(self) -> dict:
        """Summary for result.json: sizes, shrinkages, how anisotropic and off-centre the fit is."""
        ev = np.linalg.eigvalsh(self.Sigma)
        return {"model": "projected normal PN(mu, Sigma), maximum likelihood by EM", "n_fit": self.n_fit,
                "iterations": self.iterations, "mean_shrinkage": self.shrink_mean,
                "covariance_shrinkage": self.shrink_cov,
                "mean_norm_mahalanobis": float(np.sqrt(self.mu @ np.linalg.solve(self.Sigma, self.mu))),
                "eigenvalue_ratio": float(ev[-1] / ev[0])}


def ledoit_wolf_shrinkage(X) -> float:
    """Ledoit and Wolf's (2004) shrinkage intensity for the covariance S = X^T X / n of rows X taken
    as centred, toward mu I (mu = tr S / D): min(b2, d2) / d2 in [0, 1], where
    d2 = ||S - mu I||_F^2 / D and b2 = sum_k ||x_k x_k^T - S||_F^2 / (n^2 D)
       = (sum_k ||x_k||^4 / n - ||S||_F^2) / (n D).

    scikit-learn's `ledoit_wolf_shrinkage(X, assume_centered=True)` to rounding (tested); here so
    that a Dask worker fitting the surrogate does not import scikit-learn (~1 CPU-s a worker).
    """
    X = np.asarray(X, np.float64)
    n, D = X.shape
    S = X.T @ X / n
    mu = np.trace(S) / D
    dev = S - mu * np.eye(D)
    d2 = float(np.sum(dev * dev)) / D
    row4 = np.einsum("ij,ij->i", X, X) ** 2
    b2 = (float(row4.sum()) / n - float(np.sum(S * S))) / (n * D)
    b2 = min(max(b2, 0.0), d2)      # >= 0 exactly (Cauchy-Schwarz), but not after rounding
    return 0.0 if b2 == 0.0 else b2 / d2


def fit_projected_normal(U, *, max_iter: int = 500, tol: float = 1e-8, debias: bool = True,
                         init: ProjectedNormal | None = None) -> ProjectedNormal:
    """Maximum-likelihood PN(mu, Sigma) of unit rows U (n, D) by EM, then the plug-in bias corrections.

    `debias=False` returns the plain ML fit (for tests). `init`: an earlier fit to start
    EM from (refits on replicates drawn from that fit converge in a few steps).
    Raises ValueError on fewer than D + 2 rows (Sigma would be singular).
    """
    U = np.asarray(U, np.float64)
    n, D = U.shape
    if D < 2:
        raise ValueError("a projected normal needs dimension >= 2")
    if n < D + 2:
        raise ValueError(f"{n} rows cannot fit a {D}-d covariance; the surrogate needs at least D + 2 = {D + 2} rows "
                         "(raise --selection-m, or pass a reference set with --reference)")
    U = U / np.linalg.norm(U, axis=1, keepdims=True)
    # Start from the moments of the unit rows (the old surrogate), scaled to tr = D.
    if init is not None and init.ml is not None and len(init.mu) == D:
        mu, Sigma = init.ml
    else:
        mu = U.mean(axis=0)
        Sigma = np.cov(U, rowvar=False) + 1e-6 * np.eye(D)
        s = D / np.trace(Sigma)
        mu, Sigma = mu * np.sqrt(s), Sigma * s
    prev = -np.inf
    it = 0
    for it in range(1, max_iter + 1):
        er, er2 = _posterior_r(U, mu, np.linalg.inv(Sigma))
        mu = (er[:, None] * U).mean(axis=0)
        Sigma = (U * er2[:, None]).T @ U / n - np.outer(mu, mu)
        Sigma = 0.5 * (Sigma + Sigma.T) + 1e-10 * np.trace(Sigma) / D * np.eye(D)
        s = D / np.trace(Sigma)
        mu, Sigma = mu * np.sqrt(s), Sigma * s
        if it % 5 == 0 and it < max_iter:
            ll = _log_likelihood(U, mu, Sigma)
            if abs(ll - prev) <= tol * max(1.0, abs(ll)):
                break
            prev = ll
    shrink_mean = shrink_cov = 0.0
    ml = (mu.copy(), Sigma.copy())
    if debias:
        # James-Stein in the fit's own metric: n mu' Sigma^-1 mu ~ chi^2_D (noncentral) around the truth.
        q = n * float(mu @ np.linalg.solve(Sigma, mu))
        keep = max(0.0, 1.0 - (D - 2) / q) if q > 0 else 0.0
        shrink_mean = 1.0 - keep
        mu = mu * keep
        # Ledoit-Wolf on the completed rows (centred on the fitted mean): the intensity that
        # best undoes the spread of the eigenvalues at this n.
        _, er2 = _posterior_r(U, mu, np.linalg.inv(Sigma))
        X = np.sqrt(er2)[:, None] * U - mu
        shrink_cov = ledoit_wolf_shrinkage(X)
        Sigma = (1.0 - shrink_cov) * Sigma + shrink_cov * (np.trace(Sigma) / D) * np.eye(D)
    return ProjectedNormal(mu, Sigma, shrink_mean, shrink_cov, it, n, ml)
