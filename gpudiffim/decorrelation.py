"""Decorrelation of a difference (or score) image: the "afterburner", following the spatial kernel.

The difference ``D = S - T * K`` carries the template's noise convolved with
``K``: its noise power spectrum is ``s^2 + t^2 |K^(k)|^2`` for white inputs of
variances ``s^2`` (the image not convolved) and ``t^2`` (the convolved one, before
convolution), so neighbouring pixels are correlated.  Multiplying ``D^`` by

.. math:: \\phi(k) = \\sqrt{\\frac{s^2 + t^2 \\kappa^2}{s^2 + t^2 |\\hat K(k)|^2}},
          \\qquad \\kappa = \\hat K(0) = \\sum K,

makes the noise white with variance ``s^2 + t^2 kappa^2`` and keeps the flux
(``phi(0) = 1``): Rubin's ``DecorrelateALKernelTask`` (Reiss & Lupton 2016,
after Zackay, Ofek & Gal-Yam 2016, doi:10.3847/0004-637X/830/1/27).  In score
mode (a preconvolved science image, ``R = S * P - T * K``, noise power
``s^2 |P^|^2 + t^2 |K^|^2``) the factor is the matched filter

.. math:: \\phi(k) = \\frac{(s^2 + t^2 \\kappa^2) |\\hat P(k)|^2}{s^2 |\\hat P(k)|^2 + t^2 |\\hat K(k)|^2}.

Rubin realises ``K`` at the image centre only.  Here the kernel is realised
at the nodes of a grid (spacing ``grid_step``, at least the two image corners
per axis), the image is decorrelated cell by cell (a cell lies between four
nodes; it is transformed once, with a halo as wide as the decorrelation kernel,
and inverse-transformed with each corner's ``phi``) and the four results are
blended bilinearly: equivalent to a decorrelation kernel interpolated bilinearly
between the nodes.  ``tests/test_decorrelation.py`` states the error of this
against the exact per-position result.  ``s^2`` and ``t^2`` are the medians of
the two variance planes over unmasked pixels; the variance plane of the result
is ``w_1 V_s + w_2 V_t`` per pixel, with ``w_1 = mean_k |phi|^2`` (score mode:
``mean_k |P^ phi|^2``) and ``w_2 = mean_k |K^ phi|^2`` at each node, blended as
the images are (Rubin's default propagation).

Non-finite pixels and pixels with ``NO_DATA`` or ``EDGE`` set are filled with
0 before the transforms and given back their values afterwards; the mask is
unchanged.  Everything runs in the images' array module (FFTs through
:func:`gpudiffim._backend.fft_functions`: cuFFT on the GPU).
"""

import logging
from dataclasses import dataclass, field

import numpy as np
import scipy.fft

from ._backend import array_module_of, fft_functions, host_map, is_device_array, moved
from .errors import ConfigurationError
from .image import MaskedImage

__all__ = ["DecorrelationModel", "decorrelate", "node_positions"]

log = logging.getLogger(__name__)

MODES = ("difference", "score")

#: Mask planes whose pixels are filled with 0 before the transforms (and restored after).
FILL_PLANES = ("NO_DATA", "EDGE")

#: Smallest noise power relative to its value at k = 0 (see ``DecorrelationModel._factors``).
POWER_FLOOR = 1.0e-10

#: Fraction of the decorrelation kernel's energy (beyond its central pixel) left outside the halo.
HALO_TOLERANCE = 1.0e-5


def _spectral_mean(values, n_columns, xp):
    """Mean over the full 2-D frequency grid of a real, even quantity held in ``rfft2`` layout.

    Columns ``1 .. ceil(n/2) - 1`` stand for two frequencies each (``k`` and
    ``-k``); column 0 and, for even ``n``, the last column for one.
    """
    last = values.shape[-1] - (1 if n_columns % 2 == 0 else 0)
    total = values[..., 0].sum() + 2.0 * values[..., 1:last].sum()
    if n_columns % 2 == 0:
        total += values[..., -1].sum()
    return float(total) / (values.shape[-2] * n_columns)


def _power(image, shape, xp):
    """``|F(image)|^2`` on the ``rfft2`` grid of ``shape`` (the image's placement does not matter).

    An image larger than ``shape`` is cut to its centred part first (as in :func:`_centred`).
    """
    image = np.asarray(image, dtype=np.float64)
    if image.shape[0] > shape[0] or image.shape[1] > shape[1]:
        image = _centred(image, shape)
    transform = fft_functions(xp)["rfft2"](moved(image, xp), s=shape)
    return transform.real**2 + transform.imag**2


def _correlation_power(rho, shape, xp):
    """Transform ``R(k)`` of a normalised autocorrelation on the ``rfft2`` grid (1 for white noise, None).

    ``rho`` is symmetric, so ``R`` is real; truncation can make it dip below
    zero where the noise has no power, so it is floored at 1 % of its mean
    (``rho(0) = 1``).
    """
    if rho is None:
        return xp.ones((shape[0], shape[1] // 2 + 1))
    transform = fft_functions(xp)["rfft2"](moved(_centred(np.asarray(rho, dtype=np.float64), shape), xp))
    return xp.maximum(transform.real, 0.01)


def _centred(image, shape):
    """``image`` (odd sizes) zero-padded to ``shape`` with its centre pixel at ``[0, 0]``.

    An image larger than ``shape`` (e.g. a big PSF model on a small tile) is
    cut to the centred part that fits.
    """
    hy = min(image.shape[0] // 2, (shape[0] - 1) // 2)
    hx = min(image.shape[1] // 2, (shape[1] - 1) // 2)
    cy, cx = image.shape[0] // 2, image.shape[1] // 2
    image = image[cy - hy:cy + hy + 1, cx - hx:cx + hx + 1]
    out = np.zeros(shape)
    out[:image.shape[0], :image.shape[1]] = image
    return np.roll(out, (-(image.shape[0] // 2), -(image.shape[1] // 2)), axis=(0, 1))


def node_positions(length, step):
    """Node coordinates along one axis (array pixels): both ends and at most ``step`` apart.

    Parameters
    ----------
    length : int
        Pixels along the axis.
    step : float
        Largest node spacing, or ``inf`` for a single node at the centre.

    Returns
    -------
    ndarray of float
    """
    if not np.isfinite(step) or length < 2:
        return np.array([0.5 * (length - 1)])
    n_nodes = max(2, int(np.ceil((length - 1) / step)) + 1)
    return np.linspace(0.0, length - 1.0, n_nodes)


@dataclass(frozen=True, eq=False)
class DecorrelationModel:
    """The decorrelation of one difference: evaluable at any position.

    Parameters
    ----------
    kernel : SpatialKernel
        The PSF-matching kernel that made the difference.
    unconvolved_variance, convolved_variance : float
        ``s^2`` and ``t^2`` (module notes): sky variance of the image that
        was not convolved (score mode: the science image before
        preconvolution) and of the convolved one, before convolution.
    mode : {"difference", "score"}
    preconvolution_psf : ndarray of shape (m, m), optional
        ``P``, the kernel the science image was preconvolved with (score mode;
        required there).
    grid_step : float
        Node spacing (px) of :func:`decorrelate`; ``inf`` for one node at the
        centre (a constant decorrelation, as Rubin's).
    prefiltered : bool
        Score mode from a plain difference: :func:`decorrelate` correlates
        ``D`` with ``P`` itself (``R = D * P = S * P - T * (K * P)``, with
        ``kernel`` the plain ``K``), and ``phi = N_D(0) / N_D(k)`` with ``N_D``
        the plain difference's noise power (the same factor as above, with
        ``|P^|^2`` cancelled exactly instead of divided out numerically).
    unconvolved_correlation, convolved_correlation : ndarray of shape (2 L + 1, 2 L + 1), optional
        Normalised noise autocorrelation ``rho[L + dy, L + dx]`` of each input
        (:attr:`gpudiffim.covariance.NoiseCorrelation.rho`); None for white
        noise.  With them each input's noise power is ``s^2 R(k)``, ``R`` the
        transform of ``rho``, and ``phi = sqrt(N(0) / N(k))`` with ``N(k) =
        s^2 R_s + t^2 R_t |K^|^2`` whitens resampled or coadded inputs too
        (score mode: ``phi = N(0) |P^|^2 / N(k)`` with ``|P^|^2`` on the first
        term of ``N``); white inputs give the formulas of the module notes.

    Raises
    ------
    ConfigurationError
        For an unknown mode, non-positive variances, score mode without
        ``preconvolution_psf``, or ``prefiltered`` outside score mode.
    """

    kernel: object
    unconvolved_variance: float
    convolved_variance: float
    mode: str = "difference"
    preconvolution_psf: np.ndarray = field(default=None, repr=False)
    grid_step: float = 512.0
    prefiltered: bool = False
    unconvolved_correlation: np.ndarray = field(default=None, repr=False)
    convolved_correlation: np.ndarray = field(default=None, repr=False)
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.mode not in MODES:
            msg = f"mode must be one of {MODES}, got {self.mode!r}"
            raise ConfigurationError(msg)
        for name in ("unconvolved_variance", "convolved_variance"):
            value = getattr(self, name)
            if not (np.isfinite(value) and value > 0):
                msg = f"{name} must be a positive number, got {value!r}"
                raise ConfigurationError(msg)
        if self.mode == "score" and self.preconvolution_psf is None:
            msg = "score mode needs preconvolution_psf"
            raise ConfigurationError(msg)
        if self.prefiltered and self.mode != "score":
            msg = "prefiltered applies to score mode only"
            raise ConfigurationError(msg)
        if self.convolved_variance > 1e8 * self.unconvolved_variance:
            log.warning("decorrelation: convolved-image variance %.3g is > 1e8 x the other's %.3g",
                        self.convolved_variance, self.unconvolved_variance)

    def _factors(self, x, y, shape, xp):
        """``phi`` and the two terms of the noise power over their variances at parent ``(x, y)``.

        Returns ``(phi, first, second)``: the difference's noise power is
        ``s^2 first + t^2 second`` (``first = R_s`` or ``R_s |P^|^2``, ``second
        = R_t |K^|^2``).
        """
        s2, t2 = self.unconvolved_variance, self.convolved_variance
        rs, rt, first = self._fixed_terms(shape, xp)
        second = rt * _power(self.kernel.image(x, y), shape, xp)
        if self.prefiltered:       # phi from the plain difference's power; the terms are those of D * P
            phi = float(s2 * rs[0, 0] + t2 * second[0, 0]) / (s2 * rs + t2 * second)
            return phi, first, second * (first / rs)
        at_zero = float(s2 * first[0, 0] + t2 * second[0, 0])
        # Where |P^|^2 and |K^|^2 have both fallen to the transforms' rounding (score mode, far
        # beyond the PSF's band), their ratio is noise: the floor sends phi to 0 there instead.
        power = xp.maximum(s2 * first + t2 * second, POWER_FLOOR * at_zero)
        if self.mode == "difference":
            return xp.sqrt(at_zero / power), first, second
        return at_zero * first / (rs * power), first, second

    def _fixed_terms(self, shape, xp):
        """``R_s``, ``R_t`` and the first noise term (``R_s``, or ``R_s |P^|^2``): the same at every position.

        Kept per (shape, array module) for the nodes of one :func:`decorrelate`.
        """
        key = (tuple(shape), xp.__name__)
        if key not in self._cache:
            rs, rt = (_correlation_power(rho, shape, xp) for rho in (self.unconvolved_correlation,
                                                                     self.convolved_correlation))
            first = rs
            if self.mode == "score":
                psf = np.asarray(self.preconvolution_psf, dtype=np.float64)
                first = rs * _power(psf / psf.sum(), shape, xp)
            self._cache.clear()
            self._cache[key] = (rs, rt, first)
        return self._cache[key]

    def spectrum(self, x, y, shape, xp=np):
        """``phi(k)`` at parent position ``(x, y)`` on the ``rfft2`` grid of ``shape``.

        Parameters
        ----------
        x, y : float
            Parent pixel position where the kernel is realised.
        shape : tuple of int
            FFT shape (rows, columns).
        xp : module
            Array module of the result (NumPy or CuPy).

        Returns
        -------
        ndarray of shape (shape[0], shape[1] // 2 + 1), float64
        """
        return self._factors(x, y, shape, xp)[0]

    def node_terms(self, x, y, shape, xp=np):
        """``phi`` and the variance weights ``(w_1, w_2)`` at ``(x, y)`` (module notes).

        Returns
        -------
        phi : ndarray
            As :meth:`spectrum`.
        weights : tuple of float
            ``(w_1, w_2)``: the result's variance is ``w_1 V_unconvolved +
            w_2 V_convolved``.
        """
        phi, first, second = self._factors(x, y, shape, xp)
        phi2 = phi**2
        return phi, (_spectral_mean(first * phi2, shape[1], xp), _spectral_mean(second * phi2, shape[1], xp))

    def kernel_image(self, x, y, half_width):
        """Real-space decorrelation kernel at ``(x, y)``, centred, ``(2 h + 1)^2``.

        The kernel is symmetric (``phi`` is real and even), so correlating
        and convolving with it are the same.

        Returns
        -------
        ndarray of shape (2 half_width + 1, 2 half_width + 1)
        """
        side = scipy.fft.next_fast_len(max(4 * half_width + 1, 4 * max(self.kernel.shape) + 1))
        full = scipy.fft.irfft2(self.spectrum(x, y, (side, side)), s=(side, side))
        return np.roll(full, (half_width, half_width), axis=(0, 1))[:2 * half_width + 1, :2 * half_width + 1]

    def halo(self, x, y):
        """Half-width (px) that holds the decorrelation kernel at ``(x, y)``.

        The smallest ``h`` with at most :data:`HALO_TOLERANCE` of the kernel's
        energy outside its central pixel lying beyond ``h`` (Chebyshev
        distance), and at least the matching kernel's half-width.
        """
        reach = 4 * max(self.kernel.shape)
        kernel = self.kernel_image(x, y, reach)
        energy = kernel**2
        energy[reach, reach] = 0.0
        rows, columns = np.indices(energy.shape)
        distance = np.maximum(abs(rows - reach), abs(columns - reach))
        outside = np.bincount(distance.ravel(), energy.ravel())[::-1].cumsum()[::-1]   # energy at >= d
        total = outside[0] if outside[0] > 0 else 1.0
        beyond = np.nonzero(outside / total > HALO_TOLERANCE)[0]
        halo = int(beyond[-1]) if len(beyond) else 0
        return max(halo, max(self.kernel.shape) // 2)


def _axis_cells(length, nodes):
    """Cells along one axis: ``(start, stop, [(node index, weights over start..stop-1), ...])``."""
    if len(nodes) == 1:
        return [(0, length, [(0, np.ones(length))])]
    cells = []
    for i in range(len(nodes) - 1):
        start = 0 if i == 0 else int(np.ceil(nodes[i]))
        stop = length if i == len(nodes) - 2 else int(np.ceil(nodes[i + 1]))
        right = (np.arange(start, stop) - nodes[i]) / (nodes[i + 1] - nodes[i])
        cells.append((start, stop, [(i, 1.0 - right), (i + 1, right)]))
    return cells


def _fill(difference):
    """The image with filled pixels (module notes) set to 0, and their mask (None when none)."""
    xp = difference.xp
    image = difference.image
    filled = ~xp.isfinite(image) | ((difference.mask & difference.bits(list(FILL_PLANES))) != 0)
    return xp.where(filled, 0, image).astype(image.dtype, copy=False), filled


def decorrelate(difference, model, unconvolved_variance, convolved_variance, *, scale=1.0,
                response_psf=None):
    """Decorrelate a difference (or score) image, following the spatial kernel.

    Parameters
    ----------
    difference : MaskedImage
        The difference ``D`` (or raw score ``R``); its ``xy0`` places it in
        the parent frame of ``model.kernel``.
    model : DecorrelationModel
    unconvolved_variance, convolved_variance : ndarray of shape (M, N)
        Variance planes of the image not convolved (score mode: the science
        image before preconvolution) and of the convolved image before
        convolution, on the difference's grid and in its array module.
    scale : float
        Factor the difference was multiplied by after subtraction (``1 /
        kernel sum`` when the science image was convolved); the variance is
        multiplied by its square.
    response_psf : ndarray, optional
        If given (score mode), also return the response at its centre to a
        point source of unit flux whose image in ``difference`` is this PSF.

    Returns
    -------
    decorrelated : MaskedImage
        Same mask; variance ``scale^2 (w_1 V_u + w_2 V_c)``.
    response : ndarray of shape (M, N) or None
        Peak response to a unit-flux point source per pixel (with
        ``response_psf``): a PSF flux is ``decorrelated.image / response``.

    Raises
    ------
    ConfigurationError
        If a variance plane's shape differs from the difference's.
    """
    xp, dtype = difference.xp, difference.dtype
    for name, plane in (("unconvolved_variance", unconvolved_variance),
                        ("convolved_variance", convolved_variance)):
        if tuple(plane.shape) != tuple(difference.shape):
            msg = f"{name} has shape {tuple(plane.shape)}, expected {tuple(difference.shape)}"
            raise ConfigurationError(msg)
    rows, columns = difference.shape
    x0, y0 = difference.xy0
    step = np.inf if model.kernel.is_spatially_invariant else model.grid_step
    nodes_x, nodes_y = node_positions(columns, step), node_positions(rows, step)
    halo = model.halo(x0 + 0.5 * (columns - 1), y0 + 0.5 * (rows - 1))
    prefilter = model.preconvolution_psf if model.prefiltered else None
    if prefilter is not None:
        halo += np.asarray(prefilter).shape[0] // 2
    cells_x, cells_y = _axis_cells(columns, nodes_x), _axis_cells(rows, nodes_y)
    longest = (max(c[1] - c[0] for c in cells_y), max(c[1] - c[0] for c in cells_x))
    shape = tuple(scipy.fft.next_fast_len(n + 2 * halo, real=True) for n in longest)
    response_ft = None
    if response_psf is not None:
        response_ft = fft_functions(xp)["rfft2"](moved(_centred(np.asarray(response_psf, float), shape), xp))
    on_host = not is_device_array(difference.image)

    def each(function, items):
        """``function`` of every item: on the host threads (each writes its own outputs), or in turn."""
        return host_map(function, items) if on_host else [function(item) for item in items]

    def node_terms(key):
        j, i = key
        phi, weights = model.node_terms(x0 + nodes_x[i], y0 + nodes_y[j], shape, xp)
        peak = None
        if response_ft is not None:
            peak = _spectral_mean((response_ft * phi).real, shape[1], xp)    # the inverse at [0, 0]
        return phi.astype(dtype), weights, peak

    filled_image, filled = _fill(difference)
    out_image = xp.empty((rows, columns), dtype=dtype)
    out_variance = xp.empty((rows, columns), dtype=dtype)
    response = xp.empty((rows, columns), dtype=dtype) if response_psf is not None else None
    if prefilter is not None:     # the afw correlation with P: conj of P's transform, P centred at [0, 0]
        prefilter = xp.conj(fft_functions(xp)["rfft2"](moved(_centred(np.asarray(prefilter, float), shape), xp)))
        prefilter = prefilter.astype(xp.result_type(dtype, np.complex64))
    cells = [(ys, ye, y_nodes, xs, xe, x_nodes) for ys, ye, y_nodes in cells_y for xs, xe, x_nodes in cells_x]
    keys = sorted({(j, i) for _, _, y_nodes, _, _, x_nodes in cells for j, _ in y_nodes for i, _ in x_nodes})
    terms = dict(zip(keys, each(node_terms, keys)))     # every node's terms first (the cells share them)
    ffts = fft_functions(xp, threads=1 if on_host else None)   # on the host, each cell's on its own thread

    def cell(item):
        ys, ye, y_nodes, xs, xe, x_nodes = item
        _decorrelate_cell(filled_image, (ys, ye, xs, xe), y_nodes, x_nodes, terms, halo, shape, ffts,
                          (unconvolved_variance, convolved_variance), (out_image, out_variance, response),
                          prefilter)

    each(cell, cells)
    out_image = xp.where(filled, difference.image, out_image)
    out_variance = xp.where(filled, difference.variance, out_variance * dtype.type(scale**2))
    log.info("decorrelated (%s mode) on %d x %d nodes, halo %d px, FFT tiles %s", model.mode, len(nodes_x),
             len(nodes_y), halo, shape)
    decorrelated = MaskedImage._wrap(out_image, difference.mask, out_variance, difference.xy0,
                                     difference.mask_planes)
    return decorrelated, response


def _decorrelate_cell(image, box, y_nodes, x_nodes, terms, halo, shape, ffts, variances, outputs, prefilter):
    """One cell of :func:`decorrelate`: transform with its halo, apply each corner's phi, blend."""
    xp = array_module_of(image)
    ys, ye, xs, xe = box
    rows, columns = image.shape
    lo_y, hi_y, lo_x, hi_x = max(ys - halo, 0), min(ye + halo, rows), max(xs - halo, 0), min(xe + halo, columns)
    tile = xp.zeros(shape, dtype=image.dtype)
    tile[:hi_y - lo_y, :hi_x - lo_x] = image[lo_y:hi_y, lo_x:hi_x]
    transform = ffts["rfft2"](tile)
    if prefilter is not None:
        transform *= prefilter
    core = np.s_[ys - lo_y:ye - lo_y, xs - lo_x:xe - lo_x]
    out_image, out_variance, response = outputs
    region = np.s_[ys:ye, xs:xe]
    out_image[region] = 0
    out_variance[region] = 0
    if response is not None:
        response[region] = 0
    for j, weight_y in y_nodes:
        for i, weight_x in x_nodes:
            phi, (w1, w2), peak = terms[j, i]
            weight = moved(np.outer(weight_y, weight_x).astype(image.dtype), xp)
            out_image[region] += weight * ffts["irfft2"](transform * phi, s=shape)[core]
            out_variance[region] += weight * (w1 * variances[0][region] + w2 * variances[1][region])
            if response is not None:
                response[region] += weight * peak
