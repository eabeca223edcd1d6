// Spatial normal equations from the per-stamp systems (issue 4, kernel 4).
//
// gpudiffim.spatial_fit.spatial_normal_equations accumulates
//
//     M = sum_n J_n^T Q_n J_n,    b = sum_n J_n^T w_n,
//
// with Q_n (p x p) and w_n (p) the normal matrix and vector of stamp n and
// J_n (p x n_theta) the map from the spatial unknowns theta to the local
// parameters of stamp n (spatial_fit.local_parameter_maps).  Every column a
// of every J_n has at most one non-zero entry, in the same row owner[a] for
// all stamps (the local parameter that theta_a feeds), with the value
// weights[n, a] (a spatial term evaluated at the stamp centre; 0 where the
// column is zero).  Hence
//
//     M[a, b] = sum_n weights[n, a] weights[n, b] Qs_n[owner[a], owner[b]],
//     b[a]    = sum_n weights[n, a] w_n[owner[a]],
//
// with Qs_n = (Q_n + Q_n^T) / 2, as the NumPy reference symmetrises M.  Each
// term is computed as (weights[n, a] weights[n, b]) * (0.5 (Q[oa, ob] +
// Q[ob, oa])), which is bitwise the same for (a, b) and (b, a): the matrix
// comes out exactly symmetric without a second pass.
//
// Arrays are C-contiguous, double: normal_matrices (n_stamps, p, p),
// normal_vectors (n_stamps, p), owner (n_theta) int with 0 <= owner < p,
// weights (n_stamps, n_theta), matrix (n_theta, n_theta), vector (n_theta).
//
// 2-D grid, one thread per element (a, b): b = blockIdx.x * blockDim.x +
// threadIdx.x (column: consecutive threads read consecutive weights and write
// consecutive outputs), a along y; threads outside n_theta x n_theta do
// nothing.  The diagonal thread (a, a) also writes vector[a].  Cost: 4 FLOPs
// (double) per element and stamp, 4 N n_theta^2 in all, versus 2 N p
// n_theta (p + n_theta) for the dense products of the reference.
//
// No #include: NVRTC (CuPy RawModule) and the CPU emulator
// (gpudiffim/_cuda/emulator.h) both compile this text as is.

__global__ void gdi_spatial_normal_equations(const double* __restrict__ normal_matrices,
                                             const double* __restrict__ normal_vectors,
                                             const int* __restrict__ owner,
                                             const double* __restrict__ weights,
                                             int n_stamps, int p, int n_theta,
                                             double* __restrict__ matrix,
                                             double* __restrict__ vector)
{
    const int b = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
    const int a = static_cast<int>(blockIdx.y * blockDim.y + threadIdx.y);
    if (a >= n_theta || b >= n_theta) {
        return;  // surplus threads of the edge blocks (no barrier in this kernel)
    }
    const int oa = owner[a];
    const int ob = owner[b];
    const long long pp = static_cast<long long>(p) * p;
    double acc = 0.0;
    for (int n = 0; n < n_stamps; ++n) {
        const double* q = normal_matrices + n * pp;
        const double* w = weights + static_cast<long long>(n) * n_theta;
        const double qs = 0.5 * (q[oa * p + ob] + q[ob * p + oa]);  // commutative: same bits for (b, a)
        acc += (w[a] * w[b]) * qs;
    }
    matrix[static_cast<long long>(a) * n_theta + b] = acc;
    if (a == b) {
        double v = 0.0;
        for (int n = 0; n < n_stamps; ++n) {
            v += weights[static_cast<long long>(n) * n_theta + a] * normal_vectors[static_cast<long long>(n) * p + oa];
        }
        vector[a] = v;
    }
}
