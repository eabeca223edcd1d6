// Per-candidate residual moments of D / sigma (issue 4, kernel 3).
//
// One block per candidate stamp n; the block's threads stride over the
// pixels of the window [row0, row1) x [col0, col1) of the stamp (the whole
// stamp, or the core used by the later clipping stages) and accumulate, in
// double, the count, sum(z) and sum(z^2) of z = D / sqrt(V) over the pixels
// that statistics.residual_statistics uses: (mask & bad_bits) == 0, V > 0,
// 1/V finite (computed in T, as NumPy does) and D finite.  A shared-memory
// tree reduction finishes the block; thread 0 writes out[3 n + {0, 1, 2}] =
// {count, sum z, sum z^2}.  Mean and rms are finished on the host exactly
// as residual_statistics does.
//
// Stamps are C-contiguous (n_stamps, ny, nx); image sizes are runtime
// arguments.  GDI_RM_THREADS (a power of two) fixes the shared-memory size
// and must equal blockDim.x; the launch-geometry helper in
// gpudiffim/_cuda/residual_moments.py uses the same value.
//
// No #include: NVRTC (CuPy RawModule) and the CPU emulator
// (gpudiffim/_cuda/emulator.h) both compile this text as is.

#ifndef GDI_RM_THREADS
#define GDI_RM_THREADS 128
#endif

// The block's tree reduction of (count, sum z, sum z^2), written by thread 0
// to out[0..2]; every thread of the block must call it (it holds barriers).
__device__ __forceinline__ void gdi_rm_reduce(double* s_n, double* s_z, double* s_z2,
                                              double c, double sz, double sz2, double* out)
{
    const int tid = static_cast<int>(threadIdx.x);
    s_n[tid] = c;
    s_z[tid] = sz;
    s_z2[tid] = sz2;
    __syncthreads();
    for (int s = static_cast<int>(blockDim.x) / 2; s > 0; s >>= 1) {
        if (tid < s) {
            s_n[tid] += s_n[tid + s];
            s_z[tid] += s_z[tid + s];
            s_z2[tid] += s_z2[tid + s];
        }
        __syncthreads();
    }
    if (tid == 0) {
        out[0] = s_n[0];
        out[1] = s_z[0];
        out[2] = s_z2[0];
    }
}

template <typename T>
__global__ void gdi_residual_moments(const T* __restrict__ diff,
                                     const T* __restrict__ var,
                                     const int* __restrict__ mask,
                                     int bad_bits,
                                     int n_stamps, int ny, int nx,
                                     int row0, int row1, int col0, int col1,
                                     double* __restrict__ out)
{
    __shared__ double s_n[GDI_RM_THREADS];
    __shared__ double s_z[GDI_RM_THREADS];
    __shared__ double s_z2[GDI_RM_THREADS];

    const int n = static_cast<int>(blockIdx.x);
    if (n >= n_stamps) {
        return;  // uniform across the block: no thread reaches a barrier
    }
    const int tid = static_cast<int>(threadIdx.x);
    const int width = col1 - col0;
    const int npix = (row1 - row0) * width;
    const long long base = static_cast<long long>(n) * ny * nx;

    double c = 0.0;
    double sz = 0.0;
    double sz2 = 0.0;
    for (int i = tid; i < npix; i += static_cast<int>(blockDim.x)) {
        const long long p = base + static_cast<long long>(row0 + i / width) * nx + (col0 + i % width);
        const T v = var[p];
        const T d = diff[p];
        const T inv = T(1) / v;
        if ((mask[p] & bad_bits) == 0 && v > T(0) && isfinite(inv) && isfinite(d)) {
            const double z = static_cast<double>(d) * sqrt(static_cast<double>(inv));
            c += 1.0;
            sz += z;
            sz2 += z * z;
        }
    }
    gdi_rm_reduce(s_n, s_z, s_z2, c, sz, sz2, out + 3 * static_cast<long long>(n));
}

#ifndef GDI_SR_MAX_TAPS
#define GDI_SR_MAX_TAPS 4096
#endif

// gdi_stamp_residuals -- a batch's difference stamps and their residual
// moments in one pass (gpudiffim.stamps.difference_stamps followed by the
// moments above, fused: nothing but the sums, and optionally the D / sigma
// rows, is written).  For stamp n (all stamps (n_stamps, s, s), double or
// int, C-contiguous; kernels (n_stamps, kw, kw); h = kw / 2; fit region
// f = s - kw + 1) and fit pixel (y, x):
//
//     model = sum_{j, i < kw} K[n, j, i] T[n, y + j, x + i]        (afw correlation, order j, i)
//     D     = S[n, y + h, x + h] - (model + background[n])
//     V     = V_S[n, y + h, x + h] + sum_{j, i} (K[n, j, i]^2) V_T[n, y + j, x + i]
//     M     = M_S[n, y + h, x + h] | (bad_bits if any (M_T & bad_bits) in the kernel box)
//
// in double, in the order of the separate kernel-path steps (correlation
// products and sums j, i; then the subtraction and addition).  Usable
// pixels and z = D sqrt(1 / V) are those of gdi_residual_moments; count,
// sum z and sum z^2 over the window [row0, row1) x [col0, col1) of the fit
// region go to sums[3 n + {0, 1, 2}], and with write_rows every fit pixel's
// z (fill where unusable) to rows[n, y f + x].
//
// One block per stamp (grid n_stamps, blockDim.x = GDI_RM_THREADS); the
// kernel's taps are staged in shared memory; a launch with kw^2 >
// GDI_SR_MAX_TAPS writes nothing (the host wrapper refuses it first).  Cost:
// 4 kw^2 FLOPs (double) per fit pixel.
__global__ void gdi_stamp_residuals(const double* __restrict__ template_image,
                                    const double* __restrict__ template_variance,
                                    const int* __restrict__ template_mask,
                                    const double* __restrict__ science_image,
                                    const double* __restrict__ science_variance,
                                    const int* __restrict__ science_mask,
                                    const double* __restrict__ kernels,
                                    const double* __restrict__ background,
                                    int n_stamps, int s, int kw, int bad_bits,
                                    int row0, int row1, int col0, int col1,
                                    int write_rows, double fill,
                                    double* __restrict__ sums,
                                    double* __restrict__ rows)
{
    __shared__ double s_taps[GDI_SR_MAX_TAPS];
    __shared__ double s_n[GDI_RM_THREADS];
    __shared__ double s_z[GDI_RM_THREADS];
    __shared__ double s_z2[GDI_RM_THREADS];

    const int n = static_cast<int>(blockIdx.x);
    const int n_taps = kw * kw;
    if (n >= n_stamps || n_taps > GDI_SR_MAX_TAPS) {
        return;  // uniform across the block: no thread reaches a barrier
    }
    const int tid = static_cast<int>(threadIdx.x);
    const int stride = static_cast<int>(blockDim.x);
    for (int t = tid; t < n_taps; t += stride) {
        s_taps[t] = kernels[static_cast<long long>(n) * n_taps + t];
    }
    __syncthreads();

    const int f = s - kw + 1;
    const int h = kw / 2;
    const long long base = static_cast<long long>(n) * s * s;
    const double bg = background[n];
    double c = 0.0;
    double sz = 0.0;
    double sz2 = 0.0;
    for (int i = tid; i < f * f; i += stride) {
        const int y = i / f;
        const int x = i - y * f;
        double model = 0.0;
        double convolved_variance = 0.0;
        int template_bad = 0;
        for (int j = 0; j < kw; ++j) {
            const long long row = base + static_cast<long long>(y + j) * s + x;
            const double* tap = s_taps + j * kw;
            for (int k = 0; k < kw; ++k) {
                const double w = tap[k];
                model += w * template_image[row + k];
                convolved_variance += (w * w) * template_variance[row + k];
                template_bad |= template_mask[row + k] & bad_bits;
            }
        }
        const long long centre = base + static_cast<long long>(y + h) * s + (x + h);
        const double d = science_image[centre] - (model + bg);
        const double v = science_variance[centre] + convolved_variance;
        const int m = science_mask[centre] | (template_bad != 0 ? bad_bits : 0);
        const double inv = 1.0 / v;
        const bool usable = (m & bad_bits) == 0 && v > 0.0 && isfinite(inv) && isfinite(d);
        const double z = usable ? d * sqrt(inv) : fill;
        if (write_rows) {
            rows[static_cast<long long>(n) * f * f + i] = z;
        }
        if (usable && y >= row0 && y < row1 && x >= col0 && x < col1) {
            c += 1.0;
            sz += z;
            sz2 += z * z;
        }
    }
    gdi_rm_reduce(s_n, s_z, s_z2, c, sz, sz2, sums + 3 * static_cast<long long>(n));
}

// Explicit instantiations: nvcc's -Werror check compiles the bodies, and
// CuPy's name_expressions find "gdi_residual_moments<float>" / "<double>".
template __global__ void gdi_residual_moments<float>(const float*, const float*, const int*, int, int, int, int,
                                                     int, int, int, int, double*);
template __global__ void gdi_residual_moments<double>(const double*, const double*, const int*, int, int, int,
                                                      int, int, int, int, int, double*);
