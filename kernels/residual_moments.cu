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
        out[3 * static_cast<long long>(n)] = s_n[0];
        out[3 * static_cast<long long>(n) + 1] = s_z[0];
        out[3 * static_cast<long long>(n) + 2] = s_z2[0];
    }
}

// Explicit instantiations: nvcc's -Werror check compiles the bodies, and
// CuPy's name_expressions find "gdi_residual_moments<float>" / "<double>".
template __global__ void gdi_residual_moments<float>(const float*, const float*, const int*, int, int, int, int,
                                                     int, int, int, int, double*);
template __global__ void gdi_residual_moments<double>(const double*, const double*, const int*, int, int, int,
                                                      int, int, int, int, int, double*);
