// Detection and candidate selection on the GPU (issue 17): the footprint
// reductions, the core S/N ratings, the stars' adaptive moments and the mask
// test of the stamps, each in one launch instead of chains of CuPy calls.
//
// Conventions: images are row-major (rows x cols); centres are (row, column)
// int pairs relative to the image origin; "clamped" cutouts repeat the
// nearest edge pixel beyond an edge (gpudiffim.cutouts.cut_stamps, clamp=True).
//
// gdi_footprint_scan / gdi_footprint_peak (grid-stride over the pixels):
//   stats (7, n_labels) unsigned long long, zero on entry, label l >= 1 of the
//   labels image in column l - 1.  Rows: 0 area, 1 ~first flat index, 2 last
//   flat index, 3 ~smallest column, 4 largest column, 5 the largest order key
//   of the residual (gdi_det_order_key: unsigned keys ordered as the doubles),
//   6 ~(smallest flat index whose key equals row 5; written by
//   gdi_footprint_peak, after gdi_footprint_scan).  Minima are kept as maxima
//   of complements, so that every row starts at zero.
//
// gdi_footprint_centres (one thread per label): from those stats, the
//   (row, column) of footprint l's peak pixel, or the 1-px centre of its
//   bounding box when its area exceeds npix_max, in centres (n_labels, 2),
//   and its order key: the first flat index, plus n_pixels when the area is
//   below npix_min (those sort last), as gpudiffim.cutouts.footprint_centres
//   computes them on the host; a stable sort of the keys then lists the kept
//   footprints in the raster order of their first pixel.
//
// gdi_core_snr<T> (one thread per centre): ratings[k] = mean over the clamped
//   (2 radius + 1)^2 box of (sigma > 0 ? image / sigma : 0), sigma =
//   sqrt(variance) in T, summed in double and rounded to T.
//
// gdi_star_sigmas<T> (one block per centre): values holds the n ratings
//   (gdi_core_snr's), then len(images) x max_stars sigmas.  The rank of
//   centre k among the ratings (descending, NaN last, ties by index: a
//   stable argsort of -ratings); the blocks of rank < max_stars measure, on
//   each image, the adaptive-moment sigma of gpudiffim.fwhm.adaptive_sigma
//   on the clamped (2 radius + 1)^2 cutout around star_centres[k] less the
//   median of its border (rows 0 and 2r, columns 0 and 2r, corners twice),
//   and write it (NaN if invalid) to values[n + image * max_stars + rank].
//
// gdi_select_rows (one block of GDI_DET_THREADS threads): out = the rows k
//   (width ints each) of rows whose bit k is set in the packed mask (bit
//   k % 32 of the 32-bit word k / 32; the bits past n clear), in order:
//   each thread counts the bits of a run of words, a scan of the counts in
//   shared memory places its rows.
//
// gdi_stamps_flagged (one thread per centre): flagged[k] = 1 if a bad_bits
//   bit of mask_a | mask_b lies in the (2 half_size + 1)^2 box (inside the
//   image), else 0.
//
// gdi_fill_grid (one block per grid of n values): the bin medians' grid of
//   a background, its non-finite values replaced by the median of its
//   non-NaN values (0 if none is finite), as gpudiffim.candidates._Background
//   fills it.
//
// gdi_detection_residual<T> (grid-stride over the pixels of n_images planes):
//   residual = image - background (kind -1: the background itself; image,
//   variance and mask unread), the background of plane b interpolated
//   bilinearly between the bin centres of its filled (n_bins_y, n_bins_x)
//   grid with the weights of
//   gpudiffim.candidates._two_point_weights (np.interp's arithmetic, bin
//   edges of np.linspace(0, n, n_bins + 1).astype(int)), every product and
//   sum rounded as NumPy rounds them (no contraction); above = 1 where the
//   pixel is valid (no no_data bit) and residual > the threshold: kind 1
//   ("pixel_stdev") value * sqrt(max(variance, 0)) in T, kind 2 ("value")
//   value; kind 0 writes no above.
//
// No #include: NVRTC (CuPy RawModule) and the CPU emulator
// (gpudiffim/_cuda/emulator.h) both compile this text as is.

#ifndef GDI_DET_THREADS
#define GDI_DET_THREADS 64
#endif
#ifndef GDI_DET_MAX_SIDE
#define GDI_DET_MAX_SIDE 49
#endif

#if !(defined(__CUDACC__) || defined(__CUDA_ARCH__) || defined(__CUDACC_RTC__))
// The emulator's compiler (x86-64, no FMA) neither contracts nor reorders these.
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }
#endif

__device__ __forceinline__ double gdi_det_nan()
{
    union {
        unsigned long long u;
        double d;
    } bits;
    bits.u = 0x7ff8000000000000ull;
    return bits.d;
}

__device__ __forceinline__ unsigned long long gdi_det_order_key(double value)
{
    union {
        double d;
        unsigned long long u;
    } bits;
    bits.d = value + 0.0;  // -0.0 -> 0.0
    return (bits.u >> 63) ? ~bits.u : (bits.u | (1ull << 63));
}

__global__ void gdi_footprint_scan(const double* __restrict__ residual, const int* __restrict__ labels,
                                   int n_pixels, int n_cols, int n_labels,
                                   unsigned long long* __restrict__ stats)
{
    const long long stride = (long long)blockDim.x * gridDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n_pixels; i += stride) {
        const int label = labels[i];
        if (label <= 0) {
            continue;
        }
        const long long l = label - 1;
        const unsigned long long index = (unsigned long long)i;
        const unsigned long long col = (unsigned long long)(i % n_cols);
        atomicAdd(&stats[l], 1ull);
        atomicMax(&stats[n_labels + l], ~index);
        atomicMax(&stats[2ll * n_labels + l], index);
        atomicMax(&stats[3ll * n_labels + l], ~col);
        atomicMax(&stats[4ll * n_labels + l], col);
        atomicMax(&stats[5ll * n_labels + l], gdi_det_order_key(residual[i]));
    }
}

__global__ void gdi_footprint_peak(const double* __restrict__ residual, const int* __restrict__ labels,
                                   int n_pixels, int n_labels, unsigned long long* __restrict__ stats)
{
    const long long stride = (long long)blockDim.x * gridDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n_pixels; i += stride) {
        const int label = labels[i];
        if (label > 0 && gdi_det_order_key(residual[i]) == stats[5ll * n_labels + label - 1]) {
            atomicMax(&stats[6ll * n_labels + label - 1], ~(unsigned long long)i);
        }
    }
}

__global__ void gdi_footprint_centres(const unsigned long long* __restrict__ stats, int n_labels, int n_cols,
                                      int n_pixels, int npix_min, int npix_max, int* __restrict__ centres,
                                      unsigned long long* __restrict__ keys)
{
    const int l = blockIdx.x * blockDim.x + threadIdx.x;
    if (l >= n_labels) {
        return;
    }
    const long long area = (long long)stats[l];
    const long long first = (long long)~stats[n_labels + l];
    const long long last = (long long)stats[2ll * n_labels + l];
    const long long peak = (long long)~stats[6ll * n_labels + l];
    const bool big = area > npix_max;
    centres[2 * l] = (int)(big ? (first / n_cols + last / n_cols) / 2 : peak / n_cols);
    centres[2 * l + 1] = (int)(big ? ((long long)~stats[3ll * n_labels + l] + (long long)stats[4ll * n_labels + l]) / 2
                                   : peak % n_cols);
    keys[l] = (unsigned long long)(first + (area < npix_min ? n_pixels : 0));
}

__device__ __forceinline__ int gdi_det_clamp(int v, int n)
{
    return v < 0 ? 0 : (v >= n ? n - 1 : v);
}

template <typename T>
__global__ void gdi_core_snr(const T* __restrict__ image, const T* __restrict__ variance, int n_rows,
                             int n_cols, const int* __restrict__ centres, int n, int radius,
                             double* __restrict__ ratings)
{
    const int k = blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= n) {
        return;
    }
    double sum = 0.0;
    for (int dr = -radius; dr <= radius; ++dr) {
        const long long row = gdi_det_clamp(centres[2 * k] + dr, n_rows);
        for (int dc = -radius; dc <= radius; ++dc) {
            const long long p = row * n_cols + gdi_det_clamp(centres[2 * k + 1] + dc, n_cols);
            const T sigma = sqrt(variance[p]);
            sum += sigma > T(0) ? (double)(T)(image[p] / sigma) : 0.0;
        }
    }
    const int side = 2 * radius + 1;
    ratings[k] = (double)(T)(sum / (side * side));
}

// Whether rating a (index ia) comes before rating b (index ib): descending, NaN last, ties by index.
__device__ __forceinline__ bool gdi_det_ahead(double a, int ia, double b, int ib)
{
    if (a != a) {
        return b != b && ia < ib;
    }
    if (b != b) {
        return true;
    }
    return a > b || (a == b && ia < ib);
}

// Sums over the block of sums[0..n_sums)[t], returned in total[] to every thread (sums overwritten).
__device__ void gdi_det_block_sums(double (*sums)[GDI_DET_THREADS], int n_sums, double* total)
{
    for (int half = GDI_DET_THREADS / 2; half > 0; half /= 2) {
        __syncthreads();
        if ((int)threadIdx.x < half) {
            for (int s = 0; s < n_sums; ++s) {
                sums[s][threadIdx.x] += sums[s][threadIdx.x + half];
            }
        }
    }
    __syncthreads();
    for (int s = 0; s < n_sums; ++s) {
        total[s] = sums[s][0];
    }
    __syncthreads();
}

// Median of the border of the side x side cutout (shared), on every thread; NaN if a border pixel is NaN.
__device__ double gdi_det_border_median(const double* cut, int side, double* border, double* sorted)
{
    const int m = 4 * side;
    const int t = threadIdx.x;
    for (int e = t; e < m; e += GDI_DET_THREADS) {
        const int part = e / side, j = e % side;
        border[e] = part == 0 ? cut[j] : part == 1 ? cut[(side - 1) * side + j]
                                                   : part == 2 ? cut[j * side] : cut[j * side + side - 1];
    }
    __syncthreads();
    __shared__ int has_nan;
    if (t == 0) {
        has_nan = 0;
    }
    __syncthreads();
    for (int e = t; e < m; e += GDI_DET_THREADS) {
        const double v = border[e];
        if (v != v) {
            has_nan = 1;
            continue;
        }
        int rank = 0;
        for (int j = 0; j < m; ++j) {
            rank += border[j] < v || (border[j] == v && j < e);
        }
        sorted[rank] = v;
    }
    __syncthreads();
    const double median = has_nan ? gdi_det_nan()
                                  : (m % 2 ? sorted[m / 2] : (sorted[m / 2 - 1] + sorted[m / 2]) / 2.0);
    __syncthreads();
    return median;
}

template <typename T>
__global__ void gdi_star_sigmas(const T* __restrict__ image0, const T* __restrict__ image1, int n_images,
                                int n_rows, int n_cols, const int* __restrict__ centres,
                                const int* __restrict__ star_centres, int n, int radius, int max_stars,
                                int n_iter, double initial, double* __restrict__ values)
{
    __shared__ double cut[GDI_DET_MAX_SIDE * GDI_DET_MAX_SIDE];
    __shared__ double border[4 * GDI_DET_MAX_SIDE];
    __shared__ double sorted[4 * GDI_DET_MAX_SIDE];
    __shared__ double sums[4][GDI_DET_THREADS];
    const int k = blockIdx.x, t = threadIdx.x;
    const double* ratings = values;
    const double rating = ratings[k];
    double ahead = 0.0;
    for (int j = t; j < n; j += GDI_DET_THREADS) {
        ahead += gdi_det_ahead(ratings[j], j, rating, k);
    }
    sums[0][t] = ahead;
    double total[4];
    gdi_det_block_sums(sums, 1, total);
    const int rank = (int)total[0];
    if (rank >= max_stars) {
        return;  // the whole block
    }
    const int side = 2 * radius + 1, size = side * side;
    for (int image = 0; image < n_images; ++image) {
        const T* plane = image == 0 ? image0 : image1;
        for (int p = t; p < size; p += GDI_DET_THREADS) {
            const long long row = gdi_det_clamp(star_centres[2 * k] + p / side - radius, n_rows);
            cut[p] = (double)plane[row * n_cols
                                   + gdi_det_clamp(star_centres[2 * k + 1] + p % side - radius, n_cols)];
        }
        __syncthreads();
        const double median = gdi_det_border_median(cut, side, border, sorted);
        for (int p = t; p < size; p += GDI_DET_THREADS) {
            cut[p] -= median;
        }
        double weight_sigma = initial, cx = 0.0, cy = 0.0, flux = 0.0;
        for (int iteration = 0; iteration < n_iter; ++iteration) {
            double f = 0.0, sx = 0.0, sy = 0.0, sr = 0.0;
            for (int p = t; p < size; p += GDI_DET_THREADS) {
                const double ddx = (double)(p % side - radius) - cx, ddy = (double)(p / side - radius) - cy;
                const double r2 = ddx * ddx + ddy * ddy;
                const double w = cut[p] * exp(-0.5 * r2 / (weight_sigma * weight_sigma));
                f += w;
                sx += w * ddx;
                sy += w * ddy;
                sr += w * r2;
            }
            sums[0][t] = f;
            sums[1][t] = sx;
            sums[2][t] = sy;
            sums[3][t] = sr;
            gdi_det_block_sums(sums, 4, total);
            flux = total[0];
            const double mx = cx + total[1] / flux;
            const double my = cy + total[2] / flux;
            const double moment = 0.5 * total[3] / flux;
            cx = mx != mx ? 0.0 : fmin(fmax(mx, -2.0), 2.0);
            cy = my != my ? 0.0 : fmin(fmax(my, -2.0), 2.0);
            const double s2 = 2.0 * (moment != moment ? -1.0 : moment);
            weight_sigma = sqrt(fmin(fmax(s2, 0.04), (double)radius * radius));
        }
        if (t == 0) {
            const bool valid = flux > 0.0 && weight_sigma < radius / 2.0 && weight_sigma > 0.25;
            values[n + image * max_stars + rank] = valid ? weight_sigma : gdi_det_nan();
        }
        __syncthreads();
    }
}

__global__ void gdi_select_rows(const int* __restrict__ mask, int n, const int* __restrict__ rows, int width,
                                int* __restrict__ out)
{
    __shared__ int before[GDI_DET_THREADS];
    const int t = threadIdx.x;
    const int n_words = (n + 31) / 32;
    const int per_thread = (n_words + GDI_DET_THREADS - 1) / GDI_DET_THREADS;
    const int start = t * per_thread;
    const int stop = start + per_thread < n_words ? start + per_thread : n_words;
    int count = 0;
    for (int w = start; w < stop; ++w) {
        for (unsigned int bits = (unsigned int)mask[w]; bits; bits &= bits - 1u) {
            ++count;
        }
    }
    before[t] = count;
    __syncthreads();
    for (int offset = 1; offset < GDI_DET_THREADS; offset *= 2) {  // inclusive scan
        const int add = t >= offset ? before[t - offset] : 0;
        __syncthreads();
        before[t] += add;
        __syncthreads();
    }
    long long next = before[t] - count;
    for (int w = start; w < stop; ++w) {
        const unsigned int bits = (unsigned int)mask[w];
        for (int b = 0; b < 32; ++b) {
            if ((bits >> b) & 1u) {
                const long long k = 32ll * w + b;
                for (int c = 0; c < width; ++c) {
                    out[next * width + c] = rows[k * width + c];
                }
                ++next;
            }
        }
    }
}

__global__ void gdi_stamps_flagged(const int* __restrict__ mask_a, const int* __restrict__ mask_b, int n_cols,
                                   const int* __restrict__ centres, int n, int half_size, int bad_bits,
                                   int* __restrict__ flagged)
{
    const int k = blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= n) {
        return;
    }
    int found = 0;
    for (int dr = -half_size; dr <= half_size && !found; ++dr) {
        const long long row = (long long)(centres[2 * k] + dr) * n_cols + centres[2 * k + 1];
        for (int dc = -half_size; dc <= half_size; ++dc) {
            if ((mask_a[row + dc] | mask_b[row + dc]) & bad_bits) {
                found = 1;
                break;
            }
        }
    }
    flagged[k] = found;
}

__global__ void gdi_fill_grid(double* __restrict__ grids, int n)
{
    double* grid = grids + (long long)blockIdx.x * n;
    __shared__ int counts[2];  // non-NaN, finite
    __shared__ double middle[2];
    const int t = threadIdx.x;
    if (t == 0) {
        counts[0] = counts[1] = 0;
        middle[0] = middle[1] = 0.0;
    }
    __syncthreads();
    for (int e = t; e < n; e += GDI_DET_THREADS) {
        const double v = grid[e];
        if (v == v) {
            atomicAdd(&counts[0], 1);
            atomicAdd(&counts[1], (int)(v - v == 0.0));
        }
    }
    __syncthreads();
    const int m = counts[0];
    for (int e = t; e < n; e += GDI_DET_THREADS) {
        const double v = grid[e];
        if (v != v) {
            continue;
        }
        int rank = 0;
        for (int j = 0; j < n; ++j) {
            rank += grid[j] < v || (grid[j] == v && j < e);
        }
        if (rank == (m - 1) / 2) {
            middle[0] = v;
        }
        if (rank == m / 2) {
            middle[1] = v;
        }
    }
    __syncthreads();
    const double fill = counts[1] == 0 ? 0.0 : (m % 2 ? middle[1] : (middle[0] + middle[1]) / 2.0);
    for (int e = t; e < n; e += GDI_DET_THREADS) {
        if (!(grid[e] - grid[e] == 0.0)) {
            grid[e] = fill;
        }
    }
}

// Bin centre b of np.linspace(0, n, n_bins + 1).astype(int) edges: 0.5 * (e_b + e_b+1) - 0.5.
__device__ __forceinline__ double gdi_det_centre(int b, int n, int n_bins)
{
    const double step = (double)n / n_bins;
    const long long lower = (long long)(b * step);
    const long long upper = b + 1 == n_bins ? n : (long long)((b + 1) * step);
    return 0.5 * (double)(lower + upper) - 0.5;
}

// Two-point interpolation weights of pixel t along an axis of n pixels (candidates._two_point_weights).
__device__ __forceinline__ void gdi_det_weights(int t, int n, int n_bins, int* first, int* second, double* w1,
                                                double* w2)
{
    int j = -1;  // the last centre <= t
    while (j + 1 < n_bins && gdi_det_centre(j + 1, n, n_bins) <= (double)t) {
        ++j;
    }
    *first = j < 0 ? 0 : j;
    *second = *first + 1 < n_bins ? *first + 1 : n_bins - 1;
    *w1 = 1.0;
    *w2 = 0.0;
    if (j >= 0 && j + 1 < n_bins) {
        const double c = gdi_det_centre(j, n, n_bins);
        if ((double)t != c) {  // np.interp: slope * (x - x_j) + y_j
            const double d = gdi_det_centre(j + 1, n, n_bins) - c, x = (double)t - c;
            *w1 = __dadd_rn(__dmul_rn((0.0 - 1.0) / d, x), 1.0);
            *w2 = __dadd_rn(__dmul_rn((1.0 - 0.0) / d, x), 0.0);
        }
    }
}

template <typename T>
__global__ void gdi_detection_residual(const T* __restrict__ image, const T* __restrict__ variance,
                                       const int* __restrict__ mask, int n_images, int n_rows, int n_cols,
                                       int no_data,
                                       const double* __restrict__ grid, int n_bins_y, int n_bins_x, int kind,
                                       double value, double* __restrict__ residual, int* __restrict__ above)
{
    const long long plane = (long long)n_rows * n_cols, n_pixels = plane * n_images;
    const long long stride = (long long)blockDim.x * gridDim.x;
    for (long long p = (long long)blockIdx.x * blockDim.x + threadIdx.x; p < n_pixels; p += stride) {
        const long long in_plane = p % plane;
        const int row = (int)(in_plane / n_cols), col = (int)(in_plane % n_cols);
        int fy, sy, fx, sx;
        double w1y, w2y, w1x, w2x;
        gdi_det_weights(row, n_rows, n_bins_y, &fy, &sy, &w1y, &w2y);
        gdi_det_weights(col, n_cols, n_bins_x, &fx, &sx, &w1x, &w2x);
        const double* own = grid + (p / plane) * n_bins_y * n_bins_x;
        const double* lower = own + (long long)fy * n_bins_x;
        const double* upper = own + (long long)sy * n_bins_x;
        const double along_lower = __dadd_rn(__dmul_rn(lower[fx], w1x), __dmul_rn(lower[sx], w2x));
        const double along_upper = __dadd_rn(__dmul_rn(upper[fx], w1x), __dmul_rn(upper[sx], w2x));
        const double background = __dadd_rn(__dmul_rn(along_lower, w1y), __dmul_rn(along_upper, w2y));
        if (kind < 0) {
            residual[p] = background;
            continue;
        }
        const double r = (double)image[p] - background;
        residual[p] = r;
        if (kind == 0) {
            continue;
        }
        double level = value;
        if (kind == 1) {
            const T v = variance[p];
            const T positive = v != v ? v : (v > T(0) ? v : T(0));  // np.maximum(v, 0): NaN stays
            level = (double)((T)value * (T)sqrt(positive));
        }
        above[p] = (mask[p] & no_data) == 0 && r > level;
    }
}

// Explicit instantiations: nvcc's -Werror check compiles the bodies, and
// CuPy's name_expressions find them.
template __global__ void gdi_core_snr<float>(const float*, const float*, int, int, const int*, int, int, double*);
template __global__ void gdi_core_snr<double>(const double*, const double*, int, int, const int*, int, int,
                                              double*);
template __global__ void gdi_star_sigmas<float>(const float*, const float*, int, int, int, const int*,
                                                const int*, int, int, int, int, double, double*);
template __global__ void gdi_star_sigmas<double>(const double*, const double*, int, int, int, const int*,
                                                 const int*, int, int, int, int, double, double*);
template __global__ void gdi_detection_residual<float>(const float*, const float*, const int*, int, int, int,
                                                       int, const double*, int, int, int, double, double*, int*);
template __global__ void gdi_detection_residual<double>(const double*, const double*, const int*, int, int, int,
                                                        int, const double*, int, int, int, double, double*, int*);
