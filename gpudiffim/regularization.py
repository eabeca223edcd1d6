"""Choice of the delta-function regularisation strength ``lambda`` by held-out stamps.

A delta-function stamp fit has one unknown per kernel pixel (441 for a
21 x 21 kernel) on a fit region of a few hundred pixels, so its kernel is
mostly noise unless the smoothness penalty ``lambda H`` (reference section
2.5) is strong enough; ``ip_diffim``'s default (``lambda = 0.2``, absolute)
is negligible next to the normal matrix of a bright star, and its
risk-minimising scans cannot run (reference section 13).

``lambda_type="auto"`` chooses ``lambda`` by cross-validation between
stamps: each of a set of candidates is fitted with ``(M_c + lambda H) a = b_c``
and its kernel is scored on the stamp of its nearest neighbour ``d``, whose
noise is independent of the fit, by the weighted squared residual

.. math:: \\Delta\\chi^2_d(k) = (k - k_d)^T M_d (k - k_d),

its excess over the neighbour's own unregularised fit ``k_d``, with the
neighbour's background re-fitted (it differs between stamps); the median
over pairs is the score, so that a stamp no kernel predicts (a transient,
a star at the edge of the fit region) does not decide.
The kernel varies little between neighbours, so the sum over pairs is
smallest for the ``lambda`` that best predicts new data: too small leaves
the per-pixel noise in the kernel, too large smooths away the PSF
difference.  ``lambda`` is searched on a logarithmic grid scaled by the
candidates' median ``tr(M) / tr(H)``, one decade at a time, then refined by
half and a quarter of a decade around the best.
"""

import logging
from dataclasses import dataclass

import numpy as np

from ._backend import array_module_of, host_map, host_threads, on_device, single_threaded_blas, to_host

__all__ = ["LambdaChoice", "choose_lambda", "held_out_partners", "regularization_record"]

log = logging.getLogger(__name__)

#: log10 of ``lambda / (median tr(M) / tr(H))`` searched in the first (decade) pass.
_DECADES = tuple(range(-4, 2))
#: Steps (decades) of the refinement passes, each around the best so far.
_REFINEMENTS = (0.5, 0.25)


def _reachable_exponents():
    """Every exponent the search of :func:`choose_lambda` may try (the decades and their refinements),
    ascending: what the device scores in one pass."""
    reachable = set(_DECADES)
    for step in _REFINEMENTS:
        reachable |= {e + sign * step for e in reachable for sign in (-1, 1)}
    return sorted(reachable)


@dataclass(frozen=True)
class LambdaChoice:
    """Outcome of :func:`choose_lambda`.

    Attributes
    ----------
    value : float
        The chosen absolute ``lambda``.
    grid : tuple of float
        Every ``lambda`` tried, ascending.
    scores : tuple of float
        Median held-out excess ``chi^2`` of each ``lambda`` of ``grid``.
    n_pairs : int
        (fitted, held-out) stamp pairs scored.
    """

    value: float
    grid: tuple
    scores: tuple
    n_pairs: int

    def to_dict(self):
        """Plain-dict form for a result's diagnostics."""
        return {"lambda": self.value, "grid": list(self.grid), "scores": list(self.scores),
                "n_pairs": self.n_pairs}


def held_out_partners(x, y):
    """Index of each candidate's nearest other candidate (its held-out stamp).

    Parameters
    ----------
    x, y : ndarray of shape (N,)
        Candidate centres (N >= 2).

    Returns
    -------
    ndarray of int, shape (N,)
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    distance = (x[:, None] - x[None, :]) ** 2 + (y[:, None] - y[None, :]) ** 2
    np.fill_diagonal(distance, np.inf)
    return np.argmin(distance, axis=1)


def _kernel_systems(matrices, vectors, n_basis):
    """Kernel-only systems ``(S, t)``: the background, when fitted, eliminated (Schur complement).

    ``H`` does not touch the background, so the kernel of ``(M + lambda H) a
    = b`` solves ``(S + lambda H_kk) k = t``, and ``(k - k')^T S (k - k')`` is
    the excess ``chi^2`` of ``k`` over ``k'`` with the background re-fitted.
    """
    xp = array_module_of(matrices)
    block, rhs = matrices[:, :n_basis, :n_basis], vectors[:, :n_basis]
    if matrices.shape[1] == n_basis:
        return block, rhs
    cross, level = matrices[:, :n_basis, n_basis], matrices[:, n_basis, n_basis]
    level = xp.where(level > 0, level, 1.0)
    return (block - cross[:, :, None] * cross[:, None, :] / level[:, None, None],
            rhs - cross * (vectors[:, n_basis] / level)[:, None])


class _Spectra:
    """Every stamp's kernel for any ``lambda`` from one eigen-decomposition per stamp.

    With ``H_kk = U diag(h) U^T`` and ``W = U diag(h)^{-1/2}``, ``W^T S W =
    Q diag(e) Q^T`` gives ``k(lambda) = W Q (z / (e + lambda))``,
    ``z = Q^T W^T t``: one batched ``eigh`` instead of one solve per ``lambda``.
    ``H_kk`` is decomposed where the stamps live (on the GPU: no host ``eigh``).
    ``W Q`` is not formed (a 441^3 product per stamp): each kernel is
    ``W (Q s)``, two matrix-vector products per ``lambda``.
    """

    def __init__(self, matrices, vectors, regularization, n_basis, placed=None):
        xp = array_module_of(matrices)
        self.systems, rhs = _kernel_systems(matrices, vectors, n_basis)
        # on the host, one BLAS thread per host thread: a multi-threaded eigh of 441^2 stalled
        # for ~1 s (instead of 20 ms) when the other core was busy
        with single_threaded_blas():
            penalty = regularization if placed is None else placed     # placed: already where the matrices live
            h_values, h_vectors = xp.linalg.eigh(xp.asarray(penalty[:n_basis, :n_basis], dtype=np.float64))
            floor = xp.maximum(h_values.max(), 0.0) * n_basis * np.finfo(np.float64).eps
            whiten = h_vectors / xp.sqrt(xp.maximum(h_values, floor))
            parts = _map_stamps(xp, lambda systems, vectors: _whitened_spectra(whiten, systems, vectors),
                                self.systems, rhs)
        self.whiten = whiten
        self.values, self.rotation, self.projected = parts[0] if len(parts) == 1 else (
            xp.concatenate(part) for part in zip(*parts))
        self.limit = self.values.max(axis=1, keepdims=True) * self.values.shape[1] * np.finfo(np.float64).eps

    def kernels(self, values):
        """Kernel coefficients (L, N, n_basis) of every stamp for each ``lambda`` of the host sequence
        ``values`` (L,), all at once; ``lambda = 0`` gives the pseudo-inverse solutions."""
        xp = array_module_of(self.values)
        shifted = self.values + xp.asarray(np.asarray(values, dtype=np.float64))[:, None, None]
        scaled = xp.where(shifted > self.limit, self.projected / xp.where(shifted > self.limit, shifted, 1.0), 0.0)
        rotated = scaled.transpose(1, 0, 2) @ self.rotation.transpose(0, 2, 1)     # (N, L, n_basis): Q s
        return (rotated @ self.whiten.T).transpose(1, 0, 2)


def _whitened_spectra(whiten, systems, rhs):
    """``(e, Q, Q^T W^T t)`` of the stamps' kernel systems ``(S, t)`` (see :class:`_Spectra`)."""
    xp = array_module_of(systems)
    values, vectors_q = xp.linalg.eigh(whiten.T @ systems @ whiten)
    return values, vectors_q, ((rhs @ whiten)[:, None, :] @ vectors_q)[:, 0]


def _map_stamps(xp, function, *arrays):
    """``[function(*arrays)]``: all stamps at once on the GPU, split over the host threads on the host."""
    if on_device(xp):
        return [function(*arrays)]
    parts = [np.array_split(array, host_threads()) for array in arrays]
    return host_map(lambda chunks: function(*chunks), [chunks for chunks in zip(*parts) if len(chunks[0])])


def _held_out_scores(spectra, members, partners, lambdas):
    """Median over the pairs ``(members[k], partners[k])`` of the held-out excess ``chi^2`` of each ``lambda``.

    The excess of kernel ``k`` on stamp ``d`` over the best fit of ``d``
    itself, ``(k - k_d)^T S_d (k - k_d)``, needs no data term; the median
    keeps a stamp that no kernel predicts (a transient, a neighbour at the
    stamp's edge) from deciding.  Every ``lambda`` of a pass at once.
    """
    xp = array_module_of(spectra.values)
    kernels = spectra.kernels([0.0, *lambdas])
    target_best, target_s = kernels[0][partners], spectra.systems[partners]
    offset = kernels[1:, members] - target_best
    weighted = offset.transpose(1, 0, 2) @ target_s.transpose(0, 2, 1)      # (pairs, L, n_basis): S_d offset
    chi2 = (offset * weighted.transpose(1, 0, 2)).sum(axis=2)
    return to_host(xp.median(chi2, axis=1)).tolist()     # one read-back per pass (synchronizes!)


def _typical_stamps(kernel_sums):
    """Indices of the stamps whose kernel sum is within 3 robust sigma of the median.

    A source in one image only (a transient, a variable, a cosmic ray) gives
    a kernel sum far from the others, and a kernel that predicts no
    neighbour; such stamps neither fit nor judge ``lambda``.
    """
    median = np.median(kernel_sums)
    spread = 1.4826 * np.median(np.abs(kernel_sums - median))
    return np.flatnonzero(np.abs(kernel_sums - median) <= 3.0 * spread)


def choose_lambda(matrices, vectors, x, y, regularization, n_basis, placed=None):
    """Choose ``lambda`` by minimum residual on held-out stamps.

    Parameters
    ----------
    matrices : ndarray of shape (N, P, P)
        Unregularised stamp normal matrices ``M_c`` (``P = n_basis`` or
        ``n_basis + 1`` with a background), NumPy or CuPy.
    vectors : ndarray of shape (N, P)
        Stamp normal vectors ``b_c``, in the module of ``matrices``.
    x, y : ndarray of shape (N,)
        Host candidate centres (parent pixels); N >= 2.  Stamps whose kernel
        sum (the sum of the delta-function coefficients) is more than 3
        robust sigma from the median take no part.
    regularization : ndarray of shape (P, P)
        The regularisation matrix ``H`` (host).
    n_basis : int
        Kernel unknowns (the first ``n_basis`` of ``P``).
    placed : ndarray of shape (P, P), optional
        The same ``H`` already in the module of ``matrices`` (on a GPU: not copied again).

    Returns
    -------
    LambdaChoice
    """
    # the per-lambda products are small batched ones: with multi-threaded BLAS they took ~0.3 s a
    # pass instead of 4 ms (OpenBLAS, two cores); the limit nests with _Spectra's
    with single_threaded_blas():
        return _choose_lambda(matrices, vectors, x, y, regularization, n_basis, placed)


def _choose_lambda(matrices, vectors, x, y, regularization, n_basis, placed=None):
    """:func:`choose_lambda` (BLAS limited by the caller)."""
    xp = array_module_of(matrices)
    penalty = to_host(regularization)
    spectra = _Spectra(matrices, vectors, penalty, n_basis, placed)
    traces = to_host(xp.trace(matrices[:, :n_basis, :n_basis], axis1=1, axis2=2))
    scale = float(np.median(traces)) / float(np.trace(penalty[:n_basis, :n_basis]))
    members = _typical_stamps(to_host(spectra.kernels([0.01 * scale])[0].sum(axis=1)))
    if len(members) < 2:
        members = np.arange(len(x))
    partners = members[held_out_partners(np.asarray(x)[members], np.asarray(y)[members])]
    members, partners = xp.asarray(members), xp.asarray(partners)

    def held_out(exponents):
        return dict(zip(exponents, _held_out_scores(spectra, members, partners,
                                                    [scale * 10.0**e for e in exponents])))

    # on the GPU every exponent the search may reach is scored in one pass (one read-back instead
    # of one per pass); the search below then tries the same exponents as on the host
    table = held_out(_reachable_exponents()) if on_device(xp) else None
    tried = {}

    def score(exponents):
        new = [e for e in exponents if e not in tried]
        tried.update({e: table[e] for e in new} if table is not None else held_out(new))

    score(_DECADES)
    for step in _REFINEMENTS:
        best = min(tried, key=tried.get)
        score((best - step, best + step))
    best = min(tried, key=tried.get)
    exponents = sorted(tried)
    choice = LambdaChoice(scale * 10.0**best, tuple(scale * 10.0**e for e in exponents),
                          tuple(tried[e] for e in exponents), len(members))
    if not _DECADES[0] < best < _DECADES[-1]:
        log.warning("regularisation lambda %.3g is at the end of the searched range "
                    "(%.3g .. %.3g)", choice.value, choice.grid[0], choice.grid[-1])
    log.info("regularisation lambda %.4g chosen on %d held-out stamp pairs (of %d stamps)", choice.value,
             len(members), len(x))
    return choice


def regularization_record(config, regularization, choice=None):
    """What regularised the stamp fits, for a result's ``diagnostics["regularization"]``.

    Parameters
    ----------
    config : PsfMatchConfig
        The configuration the fit was asked for.
    regularization : ndarray or None
        ``H``, or None when the fits were not regularised.
    choice : LambdaChoice, optional
        The automatic choice, with ``lambda_type="auto"``.

    Returns
    -------
    dict or None
        None without regularisation; else ``lambda_type``, ``lambda`` (the
        absolute value used by every stamp, None for "relative", where it is
        ``lambda_scaling tr(M) / tr(H)`` per stamp) and, for "auto", the
        ``grid`` and held-out ``scores`` of the search.
    """
    if regularization is None:
        return None
    record = {"lambda_type": config.lambda_type, "lambda": config.lambda_value}
    if config.lambda_type == "relative":
        record.update({"lambda": None, "lambda_scaling": config.lambda_scaling})
    elif choice is not None:
        record.update(choice.to_dict())
    return record
