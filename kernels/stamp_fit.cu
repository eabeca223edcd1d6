// Per-stamp kernel fit: basis correlation and normal equations (issue 4, kernels 1 and 2).
//
// gdi_correlate_stamps -- the valid-region correlation of every stamp with a
// set of kernel images (gpudiffim.convolve.correlate_stamps, per_stamp = 0)
// or with its own kernel image (correlate_stamps_each, per_stamp = 1).
// afw convention, a correlation and not a convolution:
//
//     out[n, k, y, x] = sum_{j < kh, i < kw} K[k', j, i] * stamp[n, y + j, x + i],
//
// for 0 <= y < fy = sy - kh + 1 and 0 <= x < fx = sx - kw + 1, with k' = k
// (K_out = n_kernels outputs per stamp) or k' = n when per_stamp (K_out = 1,
// n_kernels == n_stamps).  Arrays are C-contiguous: stamps (n_stamps, sy, sx),
// kernels (n_kernels, kh, kw), out (n_stamps, K_out, fy, fx).
//
// Grid (ceil(K_out / kb), n_stamps) blocks, any blockDim.x (128 from the
// host), kb = gdi_cs_kernels_per_block(kh kw) = min(GDI_CS_KB, GDI_CS_MAX_TAPS
// / (kh kw)) kernels per block.  Block (c, n) stages the taps of kernels
// c kb .. c kb + kb - 1 (k' of each) in shared memory; each thread then owns
// GDI_CS_RX neighbouring outputs of one row for all kb kernels, so that per
// tap it loads GDI_CS_RX stamp pixels (read-only cache) and kb taps (shared,
// broadcast) for kb * GDI_CS_RX multiply-adds, instead of one load pair per
// multiply-add.  Each output is the direct sum over the taps in the order
// j, i (rows, then columns), products and sum in double, stored as T.  Cost:
// 2 * kh * kw FLOPs (double) per output, i.e. 2 N K_out fy fx kh kw in all
// (43^2 stamps, 27 kernels of 21^2: 12.6 MFLOP per stamp).  GDI_CS_MAX_TAPS
// fixes the shared array; a launch with more taps than that writes nothing
// (the host wrapper refuses it first).
//
// gdi_normal_equations -- the weighted least-squares normal equations of
// every stamp (gpudiffim._ops.NUMPY.stamp_normal_equations): with the P = n_basis +
// with_background columns c_a (c_{n_basis} = 1, the background column,
// implicit and never stored), weights w and target y of stamp n,
//
//     matrix[n, a, b] = sum_q w[q] c_a[q] c_b[q],    vector[n, a] = sum_q w[q] c_a[q] y[q],
//
// accumulated in double; the matrix is written in both triangles (bitwise
// symmetric).  columns (n_stamps, n_basis, n_pix), weights and target
// (n_stamps, n_pix), matrix (n_stamps, P, P), vector (n_stamps, P).
//
// One block per stamp (grid n_stamps).  The block walks the pixels in tiles
// staged in shared memory as P + 2 rows of `tile` doubles: the n_basis
// columns, the ones row (background only), y, w.  Each thread owns tasks
// t = tid, tid + blockDim.x, ...: t < P (P + 1) / 2 is the upper-triangle pair
// (a, b), a <= b, row-major; the P tasks after it are the vector entries
// (a, row y).  Every task is the same three-row product sum_q w r_a r_b, so
// all threads run the same loop.  When the tasks outnumber the threads the
// pixels are streamed once per round of blockDim.x tasks.  Cost: 3 FLOPs
// (double) per task and pixel, ~1.5 P^2 n_pix per stamp (400 stamps of 23^2
// pixels, P = 28: 0.12 ms on an H100).  GDI_NE_SHARED_DOUBLES
// fixes the shared array (tile = GDI_NE_SHARED_DOUBLES / (P + 2), rounded
// down to an odd count so that rows of a tile start in different banks);
// a launch with P + 2 > GDI_NE_SHARED_DOUBLES writes nothing (the host
// wrapper refuses it first).
//
// Sizes are runtime arguments: no recompilation per image or stamp size.
// No #include: NVRTC (CuPy RawModule) and the CPU emulator
// (gpudiffim/_cuda/emulator.h) both compile this text as is.

#ifndef GDI_CS_MAX_TAPS
#define GDI_CS_MAX_TAPS 4096
#endif

#ifndef GDI_NE_SHARED_DOUBLES
#define GDI_NE_SHARED_DOUBLES 4096
#endif

#ifndef GDI_CS_KB
#define GDI_CS_KB 4
#endif

#ifndef GDI_CS_RX
#define GDI_CS_RX 4
#endif

// Kernels whose taps one block stages (>= 1 when n_taps <= GDI_CS_MAX_TAPS);
// gpudiffim/_cuda/stamp_fit.py computes the grid with the same formula.
__device__ __forceinline__ int gdi_cs_kernels_per_block(int n_taps)
{
    const int fit = GDI_CS_MAX_TAPS / (n_taps > 0 ? n_taps : 1);
    return fit < GDI_CS_KB ? fit : GDI_CS_KB;
}

template <typename T>
__global__ void gdi_correlate_stamps(const T* __restrict__ stamps,
                                     const T* __restrict__ kernels,
                                     int n_stamps, int n_kernels, int per_stamp,
                                     int sy, int sx, int kh, int kw,
                                     T* __restrict__ out)
{
    __shared__ T s_taps[GDI_CS_MAX_TAPS];

    const int k_out = per_stamp ? 1 : n_kernels;
    const int n_taps = kh * kw;
    const int kb = gdi_cs_kernels_per_block(n_taps);
    const int n = static_cast<int>(blockIdx.y);
    const int k0 = static_cast<int>(blockIdx.x) * kb;
    if (n_taps > GDI_CS_MAX_TAPS || n >= n_stamps || k0 >= k_out || (per_stamp && n >= n_kernels)) {
        return;  // uniform across the block: no thread reaches the barrier
    }
    const int nk = (k_out - k0 < kb) ? k_out - k0 : kb;  // kernels of this block
    const int tid = static_cast<int>(threadIdx.x);
    const int stride = static_cast<int>(blockDim.x);

    for (int t = tid; t < nk * n_taps; t += stride) {
        const int kk = t / n_taps;
        const int source = per_stamp ? n : k0 + kk;  // k' of the header
        s_taps[t] = kernels[static_cast<long long>(source) * n_taps + (t - kk * n_taps)];
    }
    __syncthreads();

    const int fy = sy - kh + 1;
    const int fx = sx - kw + 1;
    const int groups = (fx + GDI_CS_RX - 1) / GDI_CS_RX;  // output groups per row
    const T* __restrict__ stamp = stamps + static_cast<long long>(n) * sy * sx;
    for (int g = tid; g < fy * groups; g += stride) {
        const int y = g / groups;
        const int x0 = (g - y * groups) * GDI_CS_RX;
        const int nx = (fx - x0 < GDI_CS_RX) ? fx - x0 : GDI_CS_RX;  // outputs of this group
        double acc[GDI_CS_KB][GDI_CS_RX];
#pragma unroll
        for (int kk = 0; kk < GDI_CS_KB; ++kk) {
#pragma unroll
            for (int r = 0; r < GDI_CS_RX; ++r) {
                acc[kk][r] = 0.0;
            }
        }
        for (int j = 0; j < kh; ++j) {
            const T* row = stamp + static_cast<long long>(y + j) * sx + x0;  // stamp[n, y + j, x0 + i + r]
            const T* tap = s_taps + j * kw;
            for (int i = 0; i < kw; ++i) {
                double pixel[GDI_CS_RX];
#pragma unroll
                for (int r = 0; r < GDI_CS_RX; ++r) {
                    pixel[r] = (r < nx) ? static_cast<double>(row[i + r]) : 0.0;  // x0 + r + i < sx iff r < nx
                }
#pragma unroll
                for (int kk = 0; kk < GDI_CS_KB; ++kk) {
                    if (kk < nk) {
                        const double w = static_cast<double>(tap[kk * n_taps + i]);
#pragma unroll
                        for (int r = 0; r < GDI_CS_RX; ++r) {
                            acc[kk][r] += w * pixel[r];
                        }
                    }
                }
            }
        }
#pragma unroll
        for (int kk = 0; kk < GDI_CS_KB; ++kk) {
            if (kk < nk) {
                T* dst = out + ((static_cast<long long>(n) * k_out + k0 + kk) * fy + y) * fx + x0;
#pragma unroll
                for (int r = 0; r < GDI_CS_RX; ++r) {
                    if (r < nx) {
                        dst[r] = static_cast<T>(acc[kk][r]);
                    }
                }
            }
        }
    }
}

template <typename T>
__global__ void gdi_normal_equations(const T* __restrict__ columns,
                                     const T* __restrict__ weights,
                                     const T* __restrict__ target,
                                     int n_stamps, int n_basis, int n_pix, int with_background,
                                     int per_stamp_weights,
                                     double* __restrict__ matrix,
                                     double* __restrict__ vector)
{
    __shared__ double s_rows[GDI_NE_SHARED_DOUBLES];

    const int n = static_cast<int>(blockIdx.x);
    const int p = n_basis + (with_background ? 1 : 0);
    const int n_rows = p + 2;  // columns, [ones], y, w
    if (n >= n_stamps || n_rows > GDI_NE_SHARED_DOUBLES) {
        return;  // uniform across the block
    }
    int tile = GDI_NE_SHARED_DOUBLES / n_rows;
    tile -= (tile > 1 && tile % 2 == 0) ? 1 : 0;  // odd row stride: fewer shared-memory bank conflicts
    const int row_y = p;
    const int row_w = p + 1;

    const int tid = static_cast<int>(threadIdx.x);
    const int stride = static_cast<int>(blockDim.x);
    const int n_pairs = p * (p + 1) / 2;
    const int n_tasks = n_pairs + p;
    const int rounds = (n_tasks + stride - 1) / stride;  // uniform: every thread meets every barrier

    const long long pix0 = static_cast<long long>(n) * n_pix;
    const T* __restrict__ cols = columns + pix0 * n_basis;  // cols[c n_pix + q] = columns[n, c, q]

    for (int r = 0; r < rounds; ++r) {
        const int t = r * stride + tid;
        int a = 0;
        int b = 0;
        if (t < n_pairs) {  // upper triangle, row-major: row a holds p - a pairs
            int rest = t;
            while (rest >= p - a) {
                rest -= p - a;
                ++a;
            }
            b = a + rest;
        } else if (t < n_tasks) {
            a = t - n_pairs;
            b = row_y;
        }
        double acc = 0.0;
        for (int q0 = 0; q0 < n_pix; q0 += tile) {
            const int len = (n_pix - q0 < tile) ? n_pix - q0 : tile;
            __syncthreads();  // the previous tile is no longer read
            for (int e = tid; e < n_basis * len; e += stride) {
                const int c = e / len;
                const int q = e - c * len;
                s_rows[c * tile + q] = static_cast<double>(cols[static_cast<long long>(c) * n_pix + q0 + q]);
            }
            for (int q = tid; q < len; q += stride) {
                if (with_background) {
                    s_rows[n_basis * tile + q] = 1.0;
                }
                s_rows[row_y * tile + q] = static_cast<double>(target[pix0 + q0 + q]);
                s_rows[row_w * tile + q] = static_cast<double>(weights[per_stamp_weights ? n : pix0 + q0 + q]);
            }
            __syncthreads();
            if (t < n_tasks) {
                const double* ra = s_rows + a * tile;
                const double* rb = s_rows + b * tile;
                const double* rw = s_rows + row_w * tile;
                for (int q = 0; q < len; ++q) {
                    acc += rw[q] * ra[q] * rb[q];  // (w c_a) c_b, as NumPy's (columns * weights) @ columns^T
                }
            }
        }
        if (t < n_pairs) {
            double* m = matrix + static_cast<long long>(n) * p * p;
            m[a * p + b] = acc;
            m[b * p + a] = acc;
        } else if (t < n_tasks) {
            vector[static_cast<long long>(n) * p + a] = acc;
        }
    }
}

// gdi_cut_stamps -- the stamps of a batch of candidates, cut from one image's
// three planes (gpudiffim.stamps.StampBatch.extract on the kernel path):
//
//     out_image[n, r, c] = image[row_n - half + r, col_n - half + c]   (as double),
//
// the same for the variance (as double) and the mask (int), for
// 0 <= r, c < s = 2 half + 1.  centres (n_stamps, 2) int holds (row_n, col_n)
// relative to the image's first pixel; the image is (rows, nx), C-contiguous.
// The caller has checked that every stamp lies inside the image (no bounds
// test here).  One launch replaces a gather and a conversion per plane.
// Grid-stride loop over the n_stamps s^2 outputs: any grid and block.
template <typename T>
__global__ void gdi_cut_stamps(const T* __restrict__ image,
                               const T* __restrict__ variance,
                               const int* __restrict__ mask,
                               int nx,
                               const int* __restrict__ centres,
                               int n_stamps, int half,
                               double* __restrict__ out_image,
                               double* __restrict__ out_variance,
                               int* __restrict__ out_mask)
{
    const long long s = 2LL * half + 1;
    const long long total = static_cast<long long>(n_stamps) * s * s;
    const long long stride = static_cast<long long>(blockDim.x) * gridDim.x;
    for (long long p = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; p < total; p += stride) {
        const long long n = p / (s * s);
        const long long rest = p - n * s * s;
        const long long r = rest / s;
        const long long c = rest - r * s;
        const long long q = (centres[2 * n] - half + r) * nx + (centres[2 * n + 1] - half + c);
        out_image[p] = static_cast<double>(image[q]);
        out_variance[p] = static_cast<double>(variance[q]);
        out_mask[p] = mask[q];
    }
}

// Explicit instantiations: nvcc's -Werror check compiles the bodies, and
// CuPy's name_expressions find "gdi_correlate_stamps<float>" / "<double>" "gdi_normal_equations<float>" / "<double>"
// and "gdi_cut_stamps<float>" / "<double>".
template __global__ void gdi_correlate_stamps<float>(const float*, const float*, int, int, int, int, int, int,
                                                     int, float*);
template __global__ void gdi_correlate_stamps<double>(const double*, const double*, int, int, int, int, int,
                                                      int, int, double*);
template __global__ void gdi_normal_equations<float>(const float*, const float*, const float*, int, int, int, int,
                                                     int, double*, double*);
template __global__ void gdi_normal_equations<double>(const double*, const double*, const double*, int, int, int,
                                                      int, int, double*, double*);
template __global__ void gdi_cut_stamps<float>(const float*, const float*, const int*, int, const int*, int, int,
                                               double*, double*, int*);
template __global__ void gdi_cut_stamps<double>(const double*, const double*, const int*, int, const int*, int, int,
                                                double*, double*, int*);

// gdi_constant_weights -- one weight per stamp (constant_variance_weighting,
// gpudiffim.stamps._stamp_weights on the kernel path):
//
//     level      = median over the stamp of (science_variance + template_variance)
//     weights[n] = 1 / level where level > 0, else 1 (also for a NaN level)
//     codes[n]   = 0
//
// with numpy.median's value (the middle one of the sorted n_pix values, or
// the mean of the two middle ones; NaN if any value is NaN).  The n_pix sums
// are sorted in shared memory (bitonic, padded with +inf to a power of two);
// n_pix <= GDI_CW_MAX_PIX (a power of two: the padded sort fits); infinity is +inf (from the host: no constant
// division here).  One block per stamp, any blockDim.x.
#ifndef GDI_CW_MAX_PIX
#define GDI_CW_MAX_PIX 4096
#endif

__global__ void gdi_constant_weights(const double* __restrict__ science_variance,
                                     const double* __restrict__ template_variance,
                                     int n_stamps, int n_pix, double infinity,
                                     double* __restrict__ weights,
                                     int* __restrict__ codes)
{
    __shared__ double values[GDI_CW_MAX_PIX];
    __shared__ int any_nan;

    const int n = static_cast<int>(blockIdx.x);
    const int tid = static_cast<int>(threadIdx.x);
    const int stride = static_cast<int>(blockDim.x);
    if (n >= n_stamps || n_pix > GDI_CW_MAX_PIX || n_pix < 1) {
        return;  // uniform across the block
    }
    int size = 1;
    while (size < n_pix) {
        size *= 2;
    }
    if (tid == 0) {
        any_nan = 0;
    }
    __syncthreads();
    const long long base = static_cast<long long>(n) * n_pix;
    for (int q = tid; q < size; q += stride) {
        double v = infinity;
        if (q < n_pix) {
            v = science_variance[base + q] + template_variance[base + q];
            if (v != v) {
                any_nan = 1;
            }
        }
        values[q] = v;
    }
    __syncthreads();
    for (int k = 2; k <= size; k *= 2) {  // bitonic sort, ascending
        for (int j = k / 2; j > 0; j /= 2) {
            for (int i = tid; i < size; i += stride) {
                const int partner = i ^ j;
                if (partner > i) {
                    const bool ascending = (i & k) == 0;
                    const double a = values[i];
                    const double b = values[partner];
                    if ((a > b) == ascending && a != b) {
                        values[i] = b;
                        values[partner] = a;
                    }
                }
            }
            __syncthreads();
        }
    }
    if (tid == 0) {
        const int middle = n_pix / 2;
        const double level = (n_pix % 2) ? values[middle] : (values[middle - 1] + values[middle]) / 2.0;
        weights[n] = 1.0 / ((level > 0.0 && !any_nan) ? level : 1.0);  // a NaN median is not > 0
        codes[n] = 0;
    }
}
