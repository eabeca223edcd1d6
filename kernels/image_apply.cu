// Full-image application of the spatially varying kernel (issue 4, kernel 5):
// the per-term accumulation of gpudiffim/apply.py and the mask propagation.
//
// The fixed-kernel correlations T * K_t themselves stay library calls (cuFFT
// on the GPU, SciPy/NumPy on the host); this unit does what apply.py does
// around them:
//
// * gdi_accumulate_terms<T>: for each term t in order, out[y, x] += (term_t[y, x]
//   * rows[t, y]) * cols[t, x], the step "term *= rows[:, None]; term *=
//   cols[None, :]; out += term" of _ops.NUMPY.accumulate_term, in T arithmetic
//   and in exactly that order.  On the GPU the products go through __fmul_rn /
//   __dmul_rn, which the compiler never contracts into an FMA with the
//   following addition (nvcc and NVRTC contract by default), so the result
//   equals NumPy's bit for bit (measured on an H100 for one term), except that
//   CuPy compiles with -ftz=true: float32 subnormal operands and results are
//   flushed to zero on the GPU.
// * gdi_or_filter_1d: OR of int32 mask bits over a window of 2 half + 1
//   pixels along one axis, zeros outside the image.  Two passes (axis 0 then
//   axis 1, or the reverse: OR is associative) give the OR over a full
//   (2 hy + 1) x (2 hx + 1) box: apply.propagate_mask's full-box case and the
//   box dilation of _ops.NUMPY.dilated_bad_pixels.
// * gdi_or_filter_footprint: the general case of apply.propagate_mask,
//   out[y, x] = OR of mask[y + v, x + u] over the footprint pixels
//   footprint[kh / 2 + v, kw / 2 + u] != 0 (C integer division; afw
//   correlation orientation, the one of scipy.ndimage.maximum_filter with
//   origin 0, also for even kh or kw).
// * gdi_copy_edge<T>: within hy rows and hx columns of the border, the
//   output image and variance take the input's values and the output mask
//   ORs in the input's bits and the EDGE bit (NumpyOperations.copy_edge of
//   gpudiffim/_ops.py: where the kernel does not fit, the convolved image is
//   the input); one launch over the border pixels only, instead of four
//   strips of three planes.
// * gdi_spatial_powers<T>: the 1-D factors of the spatial terms along one
//   axis (SpatialFunction.axis_powers of gpudiffim/spatial.py): row k of the
//   (order + 1, n) table is T_k (Chebyshev, on coordinates scaled to [-1, 1]
//   over the box) or t^k (raw coordinates) at t = first + i, in double, then
//   rounded to T.  Built where the image lives, so the full-image application
//   uploads no factor tables.  Chebyshev tables and monomials up to t^2 use
//   NumPy's operations in NumPy's order (bit for bit); t^k for k >= 3 is pow(),
//   within CUDA's 2 ulp of glibc's on the GPU.
// * gdi_spatial_terms: every spatial term (SpatialFunction.terms) at given
//   integer positions, the stamp centres the stamps were cut at, so that the
//   spatial fit, the kernel images and the background of the solve loop
//   upload no terms: the same 1-D powers as gdi_spatial_powers (same
//   operations, same order), multiplied in afw's term order, in double.
//
// Index conventions: images are C-contiguous, (ny, nx) or a stack (n_images,
// ny, nx); element (n, y, x) is at (n * ny + y) * nx + x, y the row and x the
// column.  Offsets are 64-bit.  The mask kernels OR all 32 bits of each
// value; for non-negative masks this is what propagate_mask's per-bit loop
// does.
//
// Launch geometry (gpudiffim/_cuda/image_apply.py): 1-D grid-stride loops
// over all output elements, any grid and block; out must not alias an input
// of the same launch.
//
// No #include: NVRTC (CuPy RawModule) and the CPU emulator
// (gpudiffim/_cuda/emulator.h) both compile this text as is.

#if defined(__CUDACC__) || defined(__CUDA_ARCH__) || defined(__CUDACC_RTC__)
// Rounded products that are never fused with a neighbouring addition.
__device__ __forceinline__ float gdi_ia_mul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double gdi_ia_mul(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ double gdi_ia_sub(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ double gdi_ia_div(double a, double b) { return __ddiv_rn(a, b); }
#else
// CPU emulator: g++ in ISO C++ mode does not contract a * b + c.
template <typename T>
inline T gdi_ia_mul(T a, T b) { return a * b; }
inline double gdi_ia_sub(double a, double b) { return a - b; }
inline double gdi_ia_div(double a, double b) { return a / b; }
#endif

// gdi_accumulate_terms<T>: every term of a batch at once,
//
//     out[y, x] = (...((out[y, x] + w_0) + w_1) ...) + w_{n-1},   w_t = (term_t[y, x] * rows[t, y]) * cols[t, x],
//
// with term_t[y, x] = terms[t, row0 + y, col0 + x] read in place from the
// (n_terms, term_rows, term_cols) stack of batched inverse transforms (no
// cropped copy).  Each step rounds in T, in term order, so the result equals
// n_terms NumPy accumulation steps bit for bit.  rows
// (n_terms, ny), cols (n_terms, nx), out (ny, nx), all C-contiguous.
template <typename T>
__global__ void gdi_accumulate_terms(const T* __restrict__ terms,
                                     int n_terms, int term_rows, int term_cols,
                                     int row0, int col0,
                                     const T* __restrict__ rows,
                                     const T* __restrict__ cols,
                                     int ny, int nx,
                                     T* __restrict__ out)
{
    const long long total = static_cast<long long>(ny) * nx;
    const long long stride = static_cast<long long>(blockDim.x) * gridDim.x;
    const long long plane = static_cast<long long>(term_rows) * term_cols;
    for (long long p = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; p < total; p += stride) {
        const long long y = p / nx;
        const long long x = p - y * nx;
        const long long source = (row0 + y) * term_cols + (col0 + x);
        T acc = out[p];
        for (int t = 0; t < n_terms; ++t) {
            const T weighted = gdi_ia_mul(gdi_ia_mul(terms[t * plane + source], rows[t * static_cast<long long>(ny) + y]),
                                          cols[t * static_cast<long long>(nx) + x]);
            acc = acc + weighted;
        }
        out[p] = acc;
    }
}

__global__ void gdi_or_filter_1d(const int* __restrict__ mask,
                                 int n_images, int ny, int nx,
                                 int half, int axis,
                                 int* __restrict__ out)
{
    const long long total = static_cast<long long>(n_images) * ny * nx;
    const long long stride = static_cast<long long>(blockDim.x) * gridDim.x;
    // axis 0: neighbours differ in y (step nx, length ny); axis 1: in x (step 1, length nx)
    const int length = axis == 0 ? ny : nx;
    const long long step = axis == 0 ? static_cast<long long>(nx) : 1;
    for (long long p = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; p < total; p += stride) {
        const long long x = p % nx;
        const long long y = (p / nx) % ny;
        const int position = static_cast<int>(axis == 0 ? y : x);
        // window [position - half, position + half] clipped to [0, length - 1]
        const int lo = position - half < 0 ? 0 : position - half;
        const int hi = position + half > length - 1 ? length - 1 : position + half;
        const long long start = p + (lo - position) * step;
        int bits = 0;
        for (int k = 0; k <= hi - lo; ++k) {
            bits |= mask[start + k * step];
        }
        out[p] = bits;
    }
}

__global__ void gdi_or_filter_footprint(const int* __restrict__ mask,
                                        const int* __restrict__ footprint,
                                        int n_images, int ny, int nx,
                                        int kh, int kw,
                                        int* __restrict__ out)
{
    const long long total = static_cast<long long>(n_images) * ny * nx;
    const long long stride = static_cast<long long>(blockDim.x) * gridDim.x;
    const int cy = kh / 2;  // footprint row of v = 0
    const int cx = kw / 2;  // footprint column of u = 0
    for (long long p = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; p < total; p += stride) {
        const int x = static_cast<int>(p % nx);
        const int y = static_cast<int>((p / nx) % ny);
        const long long plane = p - (static_cast<long long>(y) * nx + x);  // offset of pixel (n, 0, 0)
        // footprint rows i with 0 <= y + i - cy < ny, columns j with 0 <= x + j - cx < nx
        const int i0 = cy - y > 0 ? cy - y : 0;
        const int i1 = ny - y + cy < kh ? ny - y + cy : kh;
        const int j0 = cx - x > 0 ? cx - x : 0;
        const int j1 = nx - x + cx < kw ? nx - x + cx : kw;
        int bits = 0;
        for (int i = i0; i < i1; ++i) {
            const long long row = plane + static_cast<long long>(y + i - cy) * nx + (x - cx);
            for (int j = j0; j < j1; ++j) {
                if (footprint[i * kw + j] != 0) {
                    bits |= mask[row + j];
                }
            }
        }
        out[p] = bits;
    }
}

// gdi_copy_edge<T>: the border is hy top rows, hb = min(hy, ny - hy) bottom
// rows, and between them hx left and hr = min(hx, nx - hx) right columns
// (hy <= ny and hx <= nx: the wrapper clips them), so every border pixel is
// visited once even when the strips of an image smaller than the kernel
// would overlap.  Border pixel k counts the top and bottom rows first, then
// the side pixels row by row.
template <typename T>
__global__ void gdi_copy_edge(const T* __restrict__ in_image,
                              const T* __restrict__ in_variance,
                              const int* __restrict__ in_mask,
                              int ny, int nx, int hy, int hx, int edge_bit,
                              T* __restrict__ image,
                              T* __restrict__ variance,
                              int* __restrict__ mask)
{
    const long long hb = hy < ny - hy ? hy : ny - hy;
    const long long hr = hx < nx - hx ? hx : nx - hx;
    const long long across = (hy + hb) * nx;                     // pixels of the top and bottom rows
    const long long width = hx + hr;                             // side pixels per row between them
    const long long total = across + (ny - hy - hb) * width;
    const long long stride = static_cast<long long>(blockDim.x) * gridDim.x;
    for (long long k = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; k < total; k += stride) {
        long long y, x;
        if (k < across) {
            const long long row = k / nx;
            x = k - row * nx;
            y = row < hy ? row : ny - hb + (row - hy);
        } else {
            const long long s = k - across;
            const long long row = s / width;
            const long long column = s - row * width;
            y = hy + row;
            x = column < hx ? column : nx - hr + (column - hx);
        }
        const long long p = y * nx + x;
        image[p] = in_image[p];
        variance[p] = in_variance[p];
        mask[p] = mask[p] | in_mask[p] | edge_bit;
    }
}

// The scaled coordinate of SpatialFunction.normalized: 2 (t - mid) / width
// when chebyshev (mid and width computed on the host), else t.
__device__ __forceinline__ double gdi_ia_scaled(double t, int chebyshev, double mid, double width)
{
    return chebyshev ? gdi_ia_div(gdi_ia_mul(2.0, gdi_ia_sub(t, mid)), width) : t;
}

// Power k >= 2 of the 1-D factor at the scaled coordinate t, from powers
// k - 1 (current) and k - 2 (previous): 2 t T_{k-1} - T_{k-2} (Chebyshev) or
// t^k (t * t, else pow), as gpudiffim/spatial.py forms them.
__device__ __forceinline__ double gdi_ia_next_power(double t, int k, int chebyshev, double current,
                                                    double previous)
{
    if (chebyshev) {
        return gdi_ia_sub(gdi_ia_mul(gdi_ia_mul(2.0, t), current), previous);
    }
    return k == 2 ? gdi_ia_mul(t, t) : pow(t, static_cast<double>(k));
}

// gdi_spatial_powers<T>: one thread per coordinate i; t = first + i, scaled
// by gdi_ia_scaled, then the order + 1 values out[k * n + i], each rounded
// from double to T.
template <typename T>
__global__ void gdi_spatial_powers(int n, double first, int chebyshev, double mid, double width, int order,
                                   T* __restrict__ out)
{
    const int stride = blockDim.x * gridDim.x;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const double t = gdi_ia_scaled(first + i, chebyshev, mid, width);
        double previous = 1.0;       // T_0 or t^0
        double current = t;          // T_1 or t^1
        out[i] = static_cast<T>(previous);
        if (order >= 1) {
            out[static_cast<long long>(n) + i] = static_cast<T>(current);
        }
        for (int k = 2; k <= order; ++k) {
            const double next = gdi_ia_next_power(t, k, chebyshev, current, previous);
            previous = current;
            current = next;
            out[static_cast<long long>(k) * n + i] = static_cast<T>(current);
        }
    }
}

// Highest order of gdi_spatial_terms (its per-thread power tables).
#define GDI_SPATIAL_TERMS_MAX_ORDER 15

// gdi_spatial_terms: one thread per position i of the n int32 (row, column)
// centres_rc (relative to the image's first pixel, whose parent position is
// (x0, y0)): x = x0 + column, y = y0 + row, each scaled by gdi_ia_scaled
// along its axis, the powers 0..order of both factors, then
// out[i * n_terms + t] = px[d - j] * py[j] for degree d = 0..order and
// j = 0..d (afw's order, t counting up).  0 <= order <=
// GDI_SPATIAL_TERMS_MAX_ORDER; out is (n, (order + 1)(order + 2) / 2) float64.
__global__ void gdi_spatial_terms(const int* __restrict__ centres_rc, int n, int x0, int y0, int chebyshev,
                                  double mid_x, double width_x, double mid_y, double width_y, int order,
                                  double* __restrict__ out)
{
    const int stride = blockDim.x * gridDim.x;
    const int n_terms = (order + 1) * (order + 2) / 2;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        double px[GDI_SPATIAL_TERMS_MAX_ORDER + 1];
        double py[GDI_SPATIAL_TERMS_MAX_ORDER + 1];
        px[0] = 1.0;
        py[0] = 1.0;
        px[1] = gdi_ia_scaled(static_cast<double>(x0 + centres_rc[2 * i + 1]), chebyshev, mid_x, width_x);
        py[1] = gdi_ia_scaled(static_cast<double>(y0 + centres_rc[2 * i]), chebyshev, mid_y, width_y);
        for (int k = 2; k <= order; ++k) {
            px[k] = gdi_ia_next_power(px[1], k, chebyshev, px[k - 1], px[k - 2]);
            py[k] = gdi_ia_next_power(py[1], k, chebyshev, py[k - 1], py[k - 2]);
        }
        double* row = out + static_cast<long long>(i) * n_terms;
        int t = 0;
        for (int degree = 0; degree <= order; ++degree) {
            for (int j = 0; j <= degree; ++j) {
                row[t++] = gdi_ia_mul(px[degree - j], py[j]);
            }
        }
    }
}

// Explicit instantiations: nvcc's -Werror check compiles the bodies, and
// CuPy's name_expressions find "gdi_accumulate_terms<float>" / "<double>".
template __global__ void gdi_accumulate_terms<float>(const float*, int, int, int, int, int, const float*,
                                                     const float*, int, int, float*);
template __global__ void gdi_accumulate_terms<double>(const double*, int, int, int, int, int, const double*,
                                                      const double*, int, int, double*);
template __global__ void gdi_copy_edge<float>(const float*, const float*, const int*, int, int, int, int, int,
                                              float*, float*, int*);
template __global__ void gdi_copy_edge<double>(const double*, const double*, const int*, int, int, int, int, int,
                                               double*, double*, int*);
template __global__ void gdi_spatial_powers<float>(int, double, int, double, double, int, float*);
template __global__ void gdi_spatial_powers<double>(int, double, int, double, double, int, double*);
