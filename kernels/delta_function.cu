// Delta-function stamp fits: the normal equations without a design (issue 13).
//
// gdi_delta_function_normal_equations -- the kernel-path twin of
// gpudiffim.delta_function.delta_function_normal_equations.  A delta-function
// basis kernel k = (r, c) (row-major, K x K kernel) is 1 at [r, c], so its
// design column is a shifted window of the template stamp T (S x S), and
// with one weight w per stamp (constant_variance_weighting) stamp n's normal
// equations are, for the fit region y, x < F = S - K + 1,
//
//     matrix[n, (r, c), (r', c')] = w sum_{y, x < F} T(y + r, x + c) T(y + r', x + c'),
//     vector[n, (r, c)]           = w sum_{y, x < F} T(y + r, x + c) I(y, x),
//
// with I(y, x) = science[n, y + h, x + h] (h = K / 2, the fit region of the
// science stamp), and with the background's column of ones (the last unknown,
// P = K^2 + with_background):
//
//     matrix[n, (r, c), K^2] = matrix[n, K^2, (r, c)] = w sum_{y, x < F} T(y + r, x + c),
//     matrix[n, K^2, K^2] = w F^2,    vector[n, K^2] = w sum_{y, x < F} I(y, x).
//
// Each sum is accumulated in double, y then x, and multiplied by w once at
// the end (as the reference scales its sums); the matrix is written in both
// triangles from one value (bitwise symmetric).  Arrays are C-contiguous
// double: template and science (n_stamps, S, S), weights (n_stamps), matrix
// (n_stamps, P, P), vector (n_stamps, P).
//
// Grid (n_stamps, K (K + 1) / 2 + 1), any blockDim.x (128 from the host).
// Block (n, q) with q < K (K + 1) / 2 forms the kernel rows (r, r') with
// r <= r' (q counts the pairs row by row, r' fastest): its threads own the
// tasks (c, g), c < K, g < G = ceil(K / GDI_DF_RX), each the strip of
// GDI_DF_RX entries (r, c), (r', g GDI_DF_RX + i), i < GDI_DF_RX (those with
// (r', c') < (r, c), mirrored by the upper ones, are not written).  Along x
// a strip slides a window of GDI_DF_RX template pixels in registers: one
// shared-memory load of each row per pixel for GDI_DF_RX multiply-adds.  The
// last block (n, K (K + 1) / 2) forms the vector, the background column and
// its corner, one task per unknown.  Every block first stages the template
// stamp (and, the last one, the science fit region) in shared memory;
// S^2 + F^2 <= GDI_DF_SHARED_DOUBLES (the host wrapper checks it; a launch
// beyond writes nothing).  Cost: 2 F^2 FLOPs (double) per entry of the upper
// triangle, K^2 (K^2 + 1) F^2 per stamp (21 x 21 kernels on 43^2 stamps:
// 1.0e8), against 2 K^4 F^2 (twice that) for the design product, with no
// design in memory.
//
// Sizes are runtime arguments: no recompilation per stamp or kernel size.
// No #include: NVRTC (CuPy RawModule) and the CPU emulator
// (gpudiffim/_cuda/emulator.h) both compile this text as is.

#ifndef GDI_DF_SHARED_DOUBLES
#define GDI_DF_SHARED_DOUBLES 4096
#endif

#ifndef GDI_DF_RX
#define GDI_DF_RX 4
#endif

// Kernel rows (r, r2), r <= r2, of the pair index q (counted row by row).
__device__ __forceinline__ void gdi_df_row_pair(int q, int k, int* r, int* r2)
{
    int row = 0;
    while (q >= k - row) {
        q -= k - row;
        ++row;
    }
    *r = row;
    *r2 = row + q;
}

// The unweighted sums of the strip ((r, c), (r2, c0 + i)), i < GDI_DF_RX, of a stamp staged in s_t
// (S x S), into out; entries with c0 + i >= K hold sums of other pixels (not written by the caller).
__device__ __forceinline__ void gdi_df_strip(const double* s_t, int s, int k, int r, int r2, int c, int c0,
                                             double* out)
{
    const int fit = s - k + 1;
#pragma unroll
    for (int i = 0; i < GDI_DF_RX; ++i) {
        out[i] = 0.0;
    }
    for (int y = 0; y < fit; ++y) {
        const double* row_a = s_t + (y + r) * s + c;
        const double* row_b = s_t + (y + r2) * s + c0;
        double window[GDI_DF_RX];  // window[i] = T(y + r2, c0 + x + i), 0 beyond the stamp's row
#pragma unroll
        for (int i = 0; i < GDI_DF_RX - 1; ++i) {
            window[i] = (c0 + i < s) ? row_b[i] : 0.0;
        }
        for (int x = 0; x < fit; ++x) {
            window[GDI_DF_RX - 1] = (c0 + x + GDI_DF_RX - 1 < s) ? row_b[x + GDI_DF_RX - 1] : 0.0;
            const double a = row_a[x];
#pragma unroll
            for (int i = 0; i < GDI_DF_RX; ++i) {
                out[i] += a * window[i];
            }
#pragma unroll
            for (int i = 0; i < GDI_DF_RX - 1; ++i) {
                window[i] = window[i + 1];
            }
        }
    }
}

__global__ void gdi_delta_function_normal_equations(const double* __restrict__ template_stamps,
                                                    const double* __restrict__ science_stamps,
                                                    const double* __restrict__ weights,
                                                    int n_stamps, int s, int k, int with_background,
                                                    double* __restrict__ matrix,
                                                    double* __restrict__ vector)
{
    __shared__ double s_pix[GDI_DF_SHARED_DOUBLES];

    const int n = static_cast<int>(blockIdx.x);
    const int q = static_cast<int>(blockIdx.y);
    const int n_pairs = k * (k + 1) / 2;
    const int fit = s - k + 1;
    const bool vector_block = q == n_pairs;
    if (n >= n_stamps || q > n_pairs || k < 1 || fit < 1 || s * s + fit * fit > GDI_DF_SHARED_DOUBLES) {
        return;  // uniform across the block: no thread reaches the barrier
    }
    const int tid = static_cast<int>(threadIdx.x);
    const int stride = static_cast<int>(blockDim.x);
    const int h = k / 2;
    const long long pix0 = static_cast<long long>(n) * s * s;
    double* s_sci = s_pix + s * s;  // s_sci[y fit + x] = I(y, x)
    for (int e = tid; e < s * s; e += stride) {
        s_pix[e] = template_stamps[pix0 + e];
    }
    if (vector_block) {
        for (int e = tid; e < fit * fit; e += stride) {
            const int y = e / fit;
            s_sci[e] = science_stamps[pix0 + (y + h) * s + h + (e - y * fit)];
        }
    }
    __syncthreads();

    const int p = k * k + (with_background ? 1 : 0);
    const double weight = weights[n];
    double* m = matrix + static_cast<long long>(n) * p * p;
    if (vector_block) {
        for (int a = tid; a <= k * k; a += stride) {
            if (a == k * k) {  // the background's own row: sum I, and the corner
                if (with_background) {
                    double total = 0.0;
                    for (int e = 0; e < fit * fit; ++e) {
                        total += s_sci[e];
                    }
                    vector[static_cast<long long>(n) * p + a] = total * weight;
                    m[static_cast<long long>(a) * p + a] = static_cast<double>(fit * fit) * weight;
                }
                continue;
            }
            const int r = a / k;
            const int c = a - r * k;
            double product = 0.0;
            double box = 0.0;
            for (int y = 0; y < fit; ++y) {
                const double* row = s_pix + (y + r) * s + c;
                const double* sci = s_sci + y * fit;
                for (int x = 0; x < fit; ++x) {
                    product += row[x] * sci[x];
                    box += row[x];
                }
            }
            vector[static_cast<long long>(n) * p + a] = product * weight;
            if (with_background) {
                m[static_cast<long long>(a) * p + k * k] = box * weight;
                m[static_cast<long long>(k * k) * p + a] = box * weight;
            }
        }
        return;
    }

    int r = 0;
    int r2 = 0;
    gdi_df_row_pair(q, k, &r, &r2);
    const int groups = (k + GDI_DF_RX - 1) / GDI_DF_RX;
    for (int t = tid; t < k * groups; t += stride) {
        const int c = t / groups;
        const int c0 = (t - c * groups) * GDI_DF_RX;
        if (r == r2 && c0 + GDI_DF_RX - 1 < c) {
            continue;  // the whole strip lies below the diagonal: its mirror writes it
        }
        double strip[GDI_DF_RX];
        gdi_df_strip(s_pix, s, k, r, r2, c, c0, strip);
        const int a = r * k + c;
        for (int i = 0; i < GDI_DF_RX; ++i) {
            const int c2 = c0 + i;
            if (c2 < k && (r < r2 || c2 >= c)) {
                const int b = r2 * k + c2;
                m[static_cast<long long>(a) * p + b] = strip[i] * weight;
                m[static_cast<long long>(b) * p + a] = strip[i] * weight;
            }
        }
    }
}
