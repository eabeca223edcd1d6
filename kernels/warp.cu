// Lanczos-3 resampling of a masked image (the core of gpudiffim/warp.py).
//
// gdi_warp_lanczos3<T>: one output pixel p per loop iteration (1-D
// grid-stride loop over the n_out output pixels, any grid and block), given
// its source coordinates (x_src[p], y_src[p]) in the source *array* frame
// (x the column, y the row; pixel centres at integers), i.e. the pixel
// mapping of warp.pixel_mapping / warp._CoarseMapping.interpolate.  It does,
// per pixel and in the same float64 operations in the same order, what
// _resample.resample_block and the per-block tail of _resample.resample_reference do:
//
// 1. A non-finite x or y is "unmapped": off the image.
// 2. Per axis (_resample._axis_weights): snap the coordinate to rint() within
//    1e-6, i = floor, f = coordinate - i, and the 6 Lanczos-3 tap weights
//    w_k for the source pixels i - 2 + k, k = 0 .. 5, by the three-sine form
//    of _resample.lanczos_taps (the same constants, the same products), and
//    their sum S, added in tap order.
// 3. The window is inside the source padded by 3 pixels (_resample.PaddedSource)
//    when -1 <= floor(x) <= nx - 1 and -1 <= floor(y) <= ny - 1; otherwise
//    the pixel is off the image: mask = outside_bits, image = variance = 0.
// 4. Mask: OR of the source mask over the 6 x 6 window (only the column
//    floor(x) when f_x == 0, only the row floor(y) when f_y == 0: the taps
//    with non-zero weight), a pixel outside the source contributing
//    outside_bits (the padding of _resample.PaddedSource).
// 5. Image and variance (_resample._weighted_sums), in double, pixels outside
//    the source counting 0: for each window row r (in order), the row sums
//    sum_c w_x[c] I and sum_c w_x[c]^2 V (columns in order), multiplied by
//    w_y[r] and w_y[r]^2 and added; then divided by S_x S_y and (S_x S_y)^2.
// 6. If use_scale, multiplied by scale[p] and scale[p]^2 (the interpolated
//    Jacobian determinant of conserve_flux=True).
// 7. Where the mask has a no_data bit, image and variance are 0.
// 8. Image and variance are rounded to T once, at the store.
//
// warp.py precomputes four OR-ed mask variants of the padded source and
// gathers from them; here the window is OR-ed directly, which is the same
// set of pixels.  Everything warp.py does around this (the coarse grid of
// the pixel mapping and its bilinear interpolation, the Jacobian on that
// grid, the "no overlap" check) stays in the host wrapper
// gpudiffim/_cuda/warp.py::warp_resample and gpudiffim/warp.py.  Off-image
// pixels are set directly to (0, 0, outside_bits): warp.py computes throwaway
// sums for them and zeroes them in step 7, which is the same result when
// outside_bits has a no_data bit; the wrapper requires that.
//
// On the GPU every product goes through __dmul_rn, which the compiler never
// contracts into an FMA (nvcc and NVRTC contract a * b + c by default), so
// the only differences from NumPy are the last-bit differences of sin and
// cos (about 1e-16 relative).
//
// Index conventions: source planes are C-contiguous (ny, nx), element (y, x)
// at y * nx + x; x_src, y_src, scale and the outputs are C-contiguous arrays
// of n_out elements in the same (row-major) order.
//
// No #include: NVRTC (CuPy RawModule) and the CPU emulator
// (gpudiffim/_cuda/emulator.h) both compile this text as is.

#if defined(__CUDACC__) || defined(__CUDA_ARCH__) || defined(__CUDACC_RTC__)
// A rounded product that is never fused with a neighbouring addition.
__device__ __forceinline__ double gdi_warp_mul(double a, double b) { return __dmul_rn(a, b); }
#else
// CPU emulator: g++ in ISO C++ mode does not contract a * b + c.
inline double gdi_warp_mul(double a, double b) { return a * b; }
#endif

// Snapped floor, fraction, the 6 tap weights and their sum along one axis
// (_resample._axis_weights and _resample.lanczos_taps for LANCZOS_ORDER = 3).
__device__ __forceinline__ void gdi_warp_axis(double coordinate, double* floor_out, double* fraction_out,
                                              double* weights, double* sum_out)
{
    const double nearest = rint(coordinate);  // round half to even, as np.rint
    if (fabs(coordinate - nearest) < 1e-6) {  // _resample.SNAP_TOLERANCE
        coordinate = nearest;
    }
    const double lower = floor(coordinate);
    const double f = coordinate - lower;
    const double g = 1.0 - f;
    // sin(pi f) = sin(pi (1 - f)): the smaller argument keeps it accurate near f = 1
    const double sin_f = gdi_warp_mul(0.3039635509270133,  // 3 / pi^2
                                      sin(gdi_warp_mul(3.141592653589793, f < g ? f : g)));
    const double sin_part = gdi_warp_mul(sin_f, sin(gdi_warp_mul(1.0471975511965976, f)));  // pi / 3
    const double cos_part = gdi_warp_mul(sin_f, cos(gdi_warp_mul(1.0471975511965976, f)));
    // (-1)^k cos(pi k / 3) and (-1)^k sin(pi k / 3) for the taps k = -2 .. 3, as Python's math computes them
    const double cos_k[6] = {-0.4999999999999998, -0.5000000000000001, 1.0, -0.5000000000000001,
                             -0.4999999999999998, 1.0};
    const double sin_k[6] = {-0.8660254037844387, 0.8660254037844386, 0.0, -0.8660254037844386,
                             0.8660254037844387, 0.0};
    double sum = 0.0;
    for (int t = 0; t < 6; ++t) {
        const int k = t - 2;
        double offset = f - static_cast<double>(k);
        offset = gdi_warp_mul(offset, offset);
        double numerator = gdi_warp_mul(cos_k[t], sin_part);
        if (k != 0 && k != 3) {  // k % 3 != 0 in _resample.lanczos_taps
            numerator = numerator - gdi_warp_mul(sin_k[t], cos_part);
        }
        if (k == 0 && offset == 0.0) {  // integer coordinate: the exact delta
            offset = 1.0;
            numerator = 1.0;
        }
        weights[t] = numerator / offset;
        sum = t == 0 ? weights[0] : sum + weights[t];
    }
    *floor_out = lower;
    *fraction_out = f;
    *sum_out = sum;
}

template <typename T>
__global__ void gdi_warp_lanczos3(const T* __restrict__ image,
                                  const T* __restrict__ variance,
                                  const int* __restrict__ mask,
                                  int ny, int nx,
                                  const double* __restrict__ x_src,
                                  const double* __restrict__ y_src,
                                  const double* __restrict__ scale,
                                  int use_scale,
                                  int n_out,
                                  int no_data, int outside_bits,
                                  T* __restrict__ out_image,
                                  T* __restrict__ out_variance,
                                  int* __restrict__ out_mask)
{
    const long long stride = static_cast<long long>(blockDim.x) * gridDim.x;
    for (long long p = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; p < n_out; p += stride) {
        const double xs = x_src[p];
        const double ys = y_src[p];
        double x_floor = 0.0, x_fraction = 0.0, x_sum = 0.0, y_floor = 0.0, y_fraction = 0.0, y_sum = 0.0;
        double xw[6], yw[6];
        bool inside = isfinite(xs) && isfinite(ys);
        if (inside) {
            gdi_warp_axis(xs, &x_floor, &x_fraction, xw, &x_sum);
            gdi_warp_axis(ys, &y_floor, &y_fraction, yw, &y_sum);
            inside = x_floor >= -1.0 && x_floor <= nx - 1.0 && y_floor >= -1.0 && y_floor <= ny - 1.0;
        }
        if (!inside) {
            out_image[p] = T(0);
            out_variance[p] = T(0);
            out_mask[p] = outside_bits;
            continue;
        }
        const int x0 = static_cast<int>(x_floor) - 2;  // source column of tap 0
        const int y0 = static_cast<int>(y_floor) - 2;  // source row of tap 0

        // mask: OR over the taps with non-zero weight; outside the source counts outside_bits
        const int c_lo = x_fraction == 0.0 ? 2 : 0;
        const int c_hi = x_fraction == 0.0 ? 2 : 5;
        const int r_lo = y_fraction == 0.0 ? 2 : 0;
        const int r_hi = y_fraction == 0.0 ? 2 : 5;
        int bits = 0;
        for (int r = r_lo; r <= r_hi; ++r) {
            const int row = y0 + r;
            for (int c = c_lo; c <= c_hi; ++c) {
                const int column = x0 + c;
                const bool on_source = row >= 0 && row < ny && column >= 0 && column < nx;
                bits |= on_source ? mask[static_cast<long long>(row) * nx + column] : outside_bits;
            }
        }

        // sum w I and sum w^2 V, separably, in double; outside the source counts 0
        double xw2[6];
        for (int c = 0; c < 6; ++c) {
            xw2[c] = gdi_warp_mul(xw[c], xw[c]);
        }
        double sum_image = 0.0;
        double sum_variance = 0.0;
        for (int r = 0; r < 6; ++r) {
            const int row = y0 + r;
            double row_image = 0.0;
            double row_variance = 0.0;
            for (int c = 0; c < 6; ++c) {
                const int column = x0 + c;
                double value = 0.0;
                double var = 0.0;
                if (row >= 0 && row < ny && column >= 0 && column < nx) {
                    const long long q = static_cast<long long>(row) * nx + column;
                    value = static_cast<double>(image[q]);
                    var = static_cast<double>(variance[q]);
                }
                row_image = row_image + gdi_warp_mul(xw[c], value);
                row_variance = row_variance + gdi_warp_mul(xw2[c], var);
            }
            sum_image = sum_image + gdi_warp_mul(row_image, yw[r]);
            sum_variance = sum_variance + gdi_warp_mul(row_variance, gdi_warp_mul(yw[r], yw[r]));
        }
        double norm = gdi_warp_mul(x_sum, y_sum);
        sum_image = sum_image / norm;
        norm = gdi_warp_mul(norm, norm);
        sum_variance = sum_variance / norm;
        if (use_scale != 0) {
            const double s = scale[p];
            sum_image = gdi_warp_mul(sum_image, s);
            sum_variance = gdi_warp_mul(sum_variance, gdi_warp_mul(s, s));
        }
        if ((bits & no_data) != 0) {
            sum_image = 0.0;
            sum_variance = 0.0;
        }
        out_image[p] = static_cast<T>(sum_image);
        out_variance[p] = static_cast<T>(sum_variance);
        out_mask[p] = bits;
    }
}

// Explicit instantiations: nvcc's -Werror check compiles the bodies, and
// CuPy's name_expressions find "gdi_warp_lanczos3<float>" / "<double>".
template __global__ void gdi_warp_lanczos3<float>(const float*, const float*, const int*, int, int, const double*,
                                                  const double*, const double*, int, int, int, int, float*, float*,
                                                  int*);
template __global__ void gdi_warp_lanczos3<double>(const double*, const double*, const int*, int, int,
                                                   const double*, const double*, const double*, int, int, int, int,
                                                   double*, double*, int*);
