// Batched solve of small linear systems with the rank test and status of
// gpudiffim.linalg.solve_batch_status (issue 17: one launch instead of the
// ~70 CuPy calls of cuBLAS getrfBatched/getrsBatched and their glue).
//
// System s is matrices[s] (n x n, C order) x = vectors[s] (n).  One block per
// system; the augmented matrix [A | b] (n x (n + 1)) lives in shared memory.
// Steps, as the host reference (LAPACK getrf/getrs and the checks around them):
//
//   1. A or b not finite        -> status NOT_FINITE (2), solution 0;
//      A all zero               -> status ZERO_MATRIX (3), solution 0.
//   2. Gaussian elimination with partial pivoting, unblocked (LAPACK getf2):
//      at column k the pivot is the first row i >= k of largest |a[i][k]|;
//      rows k and i are swapped; a zero pivot skips the column's update.
//      pivots[s, k] = |U[k][k]|.
//   3. Rank test: full rank iff every |U[k][k]| > n eps max_k |U[k][k]|
//      (eps = 2^-52).  Rank-deficient systems get status EIGENVECTOR (1) and
//      a zero solution here (their pseudo-inverse solution is the caller's).
//   4. Back substitution on U; a solution with a non-finite value gets
//      status NOT_FINITE_SOLUTION (4) and 0, else status LU (0).
//
// gdi_solve_stamps (below) does the same for the stamp fits and writes what
// they make of the solutions (codes, kernel images, kernel sums).
//
// The factorisation is that of getf2 in exact arithmetic; LAPACK's blocked
// getrf and cuBLAS sum in other orders, so solutions agree to rounding
// (about n eps cond(A) relative), not to the bit.
//
// Arrays: matrices (N, n, n) double, vectors (N, n) double, solutions (N, n)
// double, pivots (N, n) double, status (N) int; n <= GDI_LS_MAX_N.
// Grid (N), block (GDI_LS_THREADS).  Cost: n^3 / 3 multiply-adds per system.
//
// No #include: NVRTC (CuPy RawModule) and the CPU emulator
// (gpudiffim/_cuda/emulator.h) both compile this text as is.

#ifndef GDI_LS_THREADS
#define GDI_LS_THREADS 32
#endif
#ifndef GDI_LS_MAX_N
#define GDI_LS_MAX_N 64
#endif

#define GDI_LS_LU 0
#define GDI_LS_EIGENVECTOR 1
#define GDI_LS_NOT_FINITE 2
#define GDI_LS_ZERO_MATRIX 3
#define GDI_LS_NOT_FINITE_SOLUTION 4

__device__ __forceinline__ bool gdi_ls_finite(double v)
{
    return v - v == 0.0;  // false for NaN and +-inf (inf - inf is NaN)
}

// The block's shared storage for one system: the augmented matrix [A | b]
// (n x (n + 1), row-major) and the flags and pivot row of the steps.
struct GdiLsShared {
    double a[GDI_LS_MAX_N * (GDI_LS_MAX_N + 1)];
    int bad[GDI_LS_THREADS];
    int nonzero[GDI_LS_THREADS];
    int pivot_row;
    int code;
};

// Steps 1-4 for system s by the block (every thread calls it: it holds the
// block's barriers), in the caller's __shared__ storage ws; pivots, if not
// null, gets |U[k][k]| (0 for a system not factored).  Returns the status (the
// same in every thread); with LU, ws->a[i (n + 1) + n] holds the solution.
__device__ int gdi_ls_solve(const double* __restrict__ matrices,
                            const double* __restrict__ vectors,
                            int s, int n, GdiLsShared* ws, double* pivots)
{
    double* a = ws->a;
    int* bad = ws->bad;
    int* nonzero = ws->nonzero;
    int* pivot_row = &ws->pivot_row;
    int* code = &ws->code;
    const int t = static_cast<int>(threadIdx.x);
    const int width = n + 1;
    const long long base = static_cast<long long>(s) * n;
    const double* m = matrices + base * n;
    const double* v = vectors + base;

    // 1. load [A | b], with the finite and non-zero flags of every thread's elements
    int my_bad = 0;
    int my_nonzero = 0;
    for (int e = t; e < n * width; e += GDI_LS_THREADS) {
        const int i = e / width;
        const int j = e - i * width;
        const double value = j < n ? m[i * n + j] : v[i];
        a[e] = value;
        my_bad |= gdi_ls_finite(value) ? 0 : 1;
        my_nonzero |= (j < n && value != 0.0) ? 1 : 0;
    }
    bad[t] = my_bad;
    nonzero[t] = my_nonzero;
    __syncthreads();
    if (t == 0) {
        int any_bad = 0;
        int any_nonzero = 0;
        for (int k = 0; k < GDI_LS_THREADS; ++k) {
            any_bad |= bad[k];
            any_nonzero |= nonzero[k];
        }
        *code = any_bad ? GDI_LS_NOT_FINITE : (any_nonzero ? GDI_LS_LU : GDI_LS_ZERO_MATRIX);
    }
    __syncthreads();
    const int checked = *code;
    if (checked != GDI_LS_LU) {  // uniform in the block
        for (int i = t; pivots != nullptr && i < n; i += GDI_LS_THREADS) {
            pivots[base + i] = 0.0;
        }
        __syncthreads();  // every thread has read *code before the next system may write it
        return checked;
    }

    // 2. elimination with partial pivoting (getf2)
    for (int k = 0; k < n; ++k) {
        if (t == 0) {
            int p = k;
            double largest = fabs(a[k * width + k]);
            for (int i = k + 1; i < n; ++i) {
                const double candidate = fabs(a[i * width + k]);
                if (candidate > largest) {
                    largest = candidate;
                    p = i;
                }
            }
            *pivot_row = p;
        }
        __syncthreads();
        const int p = *pivot_row;
        if (p != k) {
            for (int j = t; j < width; j += GDI_LS_THREADS) {
                const double swap = a[k * width + j];
                a[k * width + j] = a[p * width + j];
                a[p * width + j] = swap;
            }
        }
        __syncthreads();
        const double pivot = a[k * width + k];
        if (t == 0 && pivots != nullptr) {
            pivots[base + k] = fabs(pivot);
        }
        if (pivot != 0.0) {
            for (int i = k + 1 + t; i < n; i += GDI_LS_THREADS) {
                a[i * width + k] /= pivot;  // the multiplier, stored in place (L)
            }
            __syncthreads();
            const int rows = n - k - 1;
            const int columns = width - k - 1;
            for (int e = t; e < rows * columns; e += GDI_LS_THREADS) {
                const int i = k + 1 + e / columns;
                const int j = k + 1 + e % columns;
                a[i * width + j] -= a[i * width + k] * a[k * width + j];
            }
        }
        __syncthreads();
    }

    // 3. rank test, 4. back substitution (one thread: n^2 / 2 operations)
    if (t == 0) {
        double largest = 0.0;
        for (int k = 0; k < n; ++k) {
            largest = fmax(largest, fabs(a[k * width + k]));
        }
        const double floor = n * 2.220446049250313e-16 * largest;
        int full_rank = 1;
        for (int k = 0; k < n; ++k) {
            full_rank &= fabs(a[k * width + k]) > floor ? 1 : 0;
        }
        if (!full_rank) {
            *code = GDI_LS_EIGENVECTOR;
        } else {
            int finite = 1;
            for (int i = n - 1; i >= 0; --i) {
                double x = a[i * width + n];
                for (int j = i + 1; j < n; ++j) {
                    x -= a[i * width + j] * a[j * width + n];
                }
                x /= a[i * width + i];
                a[i * width + n] = x;  // the solution replaces b
                finite &= gdi_ls_finite(x) ? 1 : 0;
            }
            *code = finite ? GDI_LS_LU : GDI_LS_NOT_FINITE_SOLUTION;
        }
    }
    __syncthreads();
    const int result = *code;
    __syncthreads();  // every thread has read *code before the next system may write it
    return result;
}

__global__ void gdi_solve_small(const double* __restrict__ matrices,
                                const double* __restrict__ vectors,
                                int n_systems, int n,
                                double* __restrict__ solutions,
                                double* __restrict__ pivots,
                                int* __restrict__ status)
{
    __shared__ GdiLsShared ws;

    const int s = static_cast<int>(blockIdx.x);
    const int t = static_cast<int>(threadIdx.x);
    const int result = gdi_ls_solve(matrices, vectors, s, n, &ws, pivots);
    if (t == 0) {
        status[s] = result;
    }
    const long long base = static_cast<long long>(s) * n;
    for (int i = t; i < n; i += GDI_LS_THREADS) {
        solutions[base + i] = result == GDI_LS_LU ? ws.a[i * (n + 1) + n] : 0.0;
    }
}

// gdi_solve_stamps -- gdi_solve_small for the stamp fits of a batch
// (gpudiffim.stamps.fit_stamps on the GPU), with what the fit makes of the
// solutions, in the same launch.  System s (n = n_basis + with_background
// unknowns) is solved as above; then, with c the stamp's failure code on entry
// (codes[s]; 0 = none) and st the status:
//
//     code = fit_failed if c == 0 and st > EIGENVECTOR, else c
//     x    = the solution if code == 0 and st == LU, else 0
//            (EIGENVECTOR: no solution here, the caller's pseudo-inverse)
//
//     outcome[s] = (code, st, kernel sum, background, x[0 .. n_basis - 1])   (4 + n_basis doubles)
//     kernels[s, p] = sum_i x[i] basis[i, p]       (p < n_taps: the stamp's kernel image)
//     background[s] = x[n_basis] with a background, else 0
//
// with kernel sum = sum_i x[i] (sum_p basis[i, p]).  Arrays: codes (N) int,
// basis (n_basis, n_taps) double, outcome (N, 4 + n_basis), kernels
// (N, n_taps), background (N) double.  Grid (N), block (GDI_LS_THREADS).
__global__ void gdi_solve_stamps(const double* __restrict__ matrices,
                                 const double* __restrict__ vectors,
                                 const int* __restrict__ codes,
                                 const double* __restrict__ basis,
                                 int n_systems, int n_basis, int with_background, int n_taps, int fit_failed,
                                 double* __restrict__ outcome,
                                 double* __restrict__ kernels,
                                 double* __restrict__ background)
{
    __shared__ GdiLsShared ws;
    __shared__ double partial[GDI_LS_THREADS];

    const int s = static_cast<int>(blockIdx.x);
    const int t = static_cast<int>(threadIdx.x);
    const int n = n_basis + (with_background ? 1 : 0);
    const int width = n + 1;
    const double* a = ws.a;
    const int result = gdi_ls_solve(matrices, vectors, s, n, &ws, nullptr);
    const int entry = codes[s];
    const int failure = (entry == 0 && result > GDI_LS_EIGENVECTOR) ? fit_failed : entry;
    const bool solved = failure == 0 && result == GDI_LS_LU;
    double* row = outcome + static_cast<long long>(s) * (4 + n_basis);

    // the kernel sum: thread t sums basis kernels t, t + GDI_LS_THREADS, ...
    double sum = 0.0;
    for (int i = t; solved && i < n_basis; i += GDI_LS_THREADS) {
        double total = 0.0;
        for (int p = 0; p < n_taps; ++p) {
            total += basis[static_cast<long long>(i) * n_taps + p];
        }
        sum += a[i * width + n] * total;
    }
    partial[t] = sum;
    for (int i = t; i < n_basis; i += GDI_LS_THREADS) {
        row[4 + i] = solved ? a[i * width + n] : 0.0;
    }
    for (int p = t; p < n_taps; p += GDI_LS_THREADS) {
        double value = 0.0;
        for (int i = 0; solved && i < n_basis; ++i) {
            value += a[i * width + n] * basis[static_cast<long long>(i) * n_taps + p];
        }
        kernels[static_cast<long long>(s) * n_taps + p] = value;
    }
    __syncthreads();
    if (t == 0) {
        double kernel_sum = 0.0;
        for (int k = 0; k < GDI_LS_THREADS; ++k) {
            kernel_sum += partial[k];
        }
        const double bg = (solved && with_background) ? a[n_basis * width + n] : 0.0;
        row[0] = failure;
        row[1] = result;
        row[2] = kernel_sum;
        row[3] = bg;
        background[s] = bg;
    }
    __syncthreads();  // partial and a are free for the next system
}
