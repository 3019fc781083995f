"""KID's numba kernel, apart from kid.py so that importing kid.py (the CLI's parser reads its
defaults) does not load numba."""
from __future__ import annotations

from numba import njit


@njit(cache=True, nogil=True)
def poly_sum(k, coef0, degree, upper):
    """sum of (k[i, j] + coef0) ** degree over all (i, j), or over i < j when `upper`.

    One pass over the GEMM output, the power by repeated products: numpy's temporaries
    (k + c, k * k, ...) and its pow() per element were 3/4 of KID's time, and the
    symmetric sets need one triangle. Row sums, then their sum: float64 throughout."""
    m, n = k.shape
    total = 0.0
    for i in range(m):
        row = 0.0
        for j in range(i + 1 if upper else 0, n):
            v = k[i, j] + coef0
            p = v
            for _ in range(degree - 1):
                p *= v
            row += p
        total += row
    return total


@njit(cache=True, nogil=True)
def poly_in_place(k, coef0, degree):
    """k[i, j] = (k[i, j] + coef0) ** degree, the power by repeated products (as `poly_sum`)."""
    m, n = k.shape
    for i in range(m):
        for j in range(n):
            v = k[i, j] + coef0
            p = v
            for _ in range(degree - 1):
                p *= v
            k[i, j] = p
