// Robust statistics of the noise measurements (issue 17): the order
// statistics of gpudiffim.statistics read in one launch instead of the
// where/take_along_axis/floor/minimum glue around a sort, or around one sort
// of the whole image by (bin, value).
//
// gdi_sorted_quantiles: rows sorted once by the caller (CuPy sort), with the
// values not selected replaced by +inf (so the selected values lead, NaN
// last); per row, the count of selected values (from the boolean mask), the
// linear quantiles q_k at q_k (n - 1) and, with `median`, np.median, all as
// gpudiffim.statistics.masked_quantiles computes them:
//
//     v = last q, last = max(n - 1, 0), low = min(floor(v), last),
//     high = min(low + 1, last), g = v - floor(v), d = b - a,
//     q = g >= 0.5 ? b - d (1 - g) : a + d g      (a, b the values at low, high)
//     median = n odd ? x[n / 2] : (x[(n - 1) / 2] + x[n / 2]) / 2
//
// NaN for a row with no value selected or a selected NaN (which sorts last:
// the row's last value is NaN).  out (n_quantiles + median + 1, n_rows)
// double: the quantiles, the median, then the count.  One block per row
// (the count is a block reduction over the row's mask); block
// GDI_ST_THREADS.
//
// gdi_bin_medians<T>: np.median of the kept pixels of every bin of an image
// or a stack of images (B, ny, nx), bins between row edges edges[0..n_by]
// and column edges edges[n_by + 1 ..] (as gpudiffim.statistics.
// bin_medians_loop).  One block per bin (grid (n_bx, n_by, B)): the bin's
// pixels become order-preserving unsigned keys in shared memory (NaN after
// +inf, -0.0 as 0.0; pixels not kept, and the padding to a power of two,
// after every value), a bitonic sort orders them, and the middle key(s) are
// decoded; an even count averages the two middle values in T, as np.median.
// NaN for an empty bin or one holding a NaN.  keep (same shape as the image)
// is read when has_keep is 1.  A bin holds at most GDI_ST_MAX_BIN pixels
// (the wrapper falls back to the sorted path beyond).  out (B, n_by, n_bx)
// double.
//
// gdi_bin_sort_keys / gdi_sorted_bin_medians: the same medians for float
// bins too large for shared memory, as gpudiffim.statistics.bin_medians_sorted:
// 64-bit keys (bin, value) built from the edges in one launch, one CuPy sort,
// and each bin's middle keys found by binary search in a second launch.
//
// No #include: NVRTC (CuPy RawModule) and the CPU emulator
// (gpudiffim/_cuda/emulator.h) both compile this text as is.

#ifndef GDI_ST_THREADS
#define GDI_ST_THREADS 256
#endif
#ifndef GDI_ST_MAX_BIN
#define GDI_ST_MAX_BIN 4096
#endif

#if defined(__CUDACC__) || defined(__CUDA_ARCH__) || defined(__CUDACC_RTC__)
// Rounded products that are never fused with a neighbouring addition (NVRTC contracts a * b + c).
__device__ __forceinline__ double gdi_st_mul(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ unsigned int gdi_st_bits(float v) { return __float_as_uint(v); }
__device__ __forceinline__ unsigned long long gdi_st_bits(double v)
{
    return static_cast<unsigned long long>(__double_as_longlong(v));
}
__device__ __forceinline__ float gdi_st_value(unsigned int bits) { return __uint_as_float(bits); }
__device__ __forceinline__ double gdi_st_value(unsigned long long bits)
{
    return __longlong_as_double(static_cast<long long>(bits));
}
#define GDI_ST_NAN_F __int_as_float(0x7fc00000)
#define GDI_ST_NAN_D __longlong_as_double(0x7ff8000000000000LL)
#define GDI_ST_INF_D __longlong_as_double(0x7ff0000000000000LL)
#else
// CPU emulator: g++ in ISO C++ mode does not contract a * b + c.
inline double gdi_st_mul(double a, double b) { return a * b; }
inline unsigned int gdi_st_bits(float v) { return __builtin_bit_cast(unsigned int, v); }
inline unsigned long long gdi_st_bits(double v) { return __builtin_bit_cast(unsigned long long, v); }
inline float gdi_st_value(unsigned int bits) { return __builtin_bit_cast(float, bits); }
inline double gdi_st_value(unsigned long long bits) { return __builtin_bit_cast(double, bits); }
#define GDI_ST_NAN_F __builtin_bit_cast(float, 0x7fc00000u)
#define GDI_ST_NAN_D __builtin_bit_cast(double, 0x7ff8000000000000ull)
#define GDI_ST_INF_D __builtin_bit_cast(double, 0x7ff0000000000000ull)
#endif

__device__ __forceinline__ bool gdi_st_isnan(double v) { return v != v; }

// The unsigned key type of T, its sign bit, a quiet NaN and the key of "no value".
template <typename T>
struct GdiStKey;
template <>
struct GdiStKey<float> {
    typedef unsigned int type;
    static __device__ __forceinline__ unsigned int sign() { return 0x80000000u; }
    static __device__ __forceinline__ float nan() { return GDI_ST_NAN_F; }
    static __device__ __forceinline__ unsigned int none() { return 0xffffffffu; }
};
template <>
struct GdiStKey<double> {
    typedef unsigned long long type;
    static __device__ __forceinline__ unsigned long long sign() { return 0x8000000000000000ull; }
    static __device__ __forceinline__ double nan() { return GDI_ST_NAN_D; }
    static __device__ __forceinline__ unsigned long long none() { return 0xffffffffffffffffull; }
};

// Order-preserving key of v (gpudiffim.statistics._sort_keys_float32, any width).
template <typename T>
__device__ __forceinline__ typename GdiStKey<T>::type gdi_st_key(T v)
{
    typedef GdiStKey<T> K;
    const typename K::type bits = gdi_st_bits(gdi_st_isnan(v) ? K::nan() : static_cast<T>(v + T(0)));
    return (bits & K::sign()) ? ~bits : (bits | K::sign());
}

template <typename T>
__device__ __forceinline__ T gdi_st_decode(typename GdiStKey<T>::type key)
{
    typedef GdiStKey<T> K;
    return gdi_st_value((key & K::sign()) ? (key & ~K::sign()) : ~key);
}

__device__ __forceinline__ double gdi_st_quantile(const double* __restrict__ row, long long last, double q)
{
    const double virtual_index = static_cast<double>(last) * q;
    const double previous = floor(virtual_index);
    const double gamma = virtual_index - previous;
    long long low = static_cast<long long>(previous);
    low = low < last ? low : last;
    const long long high = low + 1 < last ? low + 1 : last;
    const double a = row[low];
    const double b = row[high];
    const double difference = b - a;
    return gamma >= 0.5 ? b - gdi_st_mul(difference, 1.0 - gamma) : a + gdi_st_mul(difference, gamma);
}

__global__ void gdi_sorted_quantiles(const double* __restrict__ ordered,
                                     const bool* __restrict__ mask,
                                     int n_rows, int n,
                                     int n_quantiles, double q0, double q1, double q2, double q3,
                                     int median,
                                     double* __restrict__ out)
{
    __shared__ long long partial[GDI_ST_THREADS];
    const int r = blockIdx.x;
    const long long offset = static_cast<long long>(r) * n;
    long long count = 0;
    for (long long i = threadIdx.x; i < n; i += blockDim.x) {
        count += mask[offset + i] ? 1 : 0;
    }
    partial[threadIdx.x] = count;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
        if (static_cast<int>(threadIdx.x) < stride) {
            partial[threadIdx.x] += partial[threadIdx.x + stride];
        }
        __syncthreads();
    }
    if (threadIdx.x != 0) {
        return;
    }
    count = partial[0];
    const double* row = ordered + offset;
    const bool valid = count > 0 && !gdi_st_isnan(row[n - 1]);
    const long long last = count > 0 ? count - 1 : 0;
    const double qs[4] = {q0, q1, q2, q3};
    for (int k = 0; k < n_quantiles; ++k) {
        out[static_cast<long long>(k) * n_rows + r] = valid ? gdi_st_quantile(row, last, qs[k]) : GDI_ST_NAN_D;
    }
    int written = n_quantiles;
    if (median) {
        const double lower = row[last / 2];
        const double upper = row[count / 2];
        const double value = (count % 2 == 1) ? upper : (lower + upper) / 2;
        out[static_cast<long long>(written) * n_rows + r] = valid ? value : GDI_ST_NAN_D;
        ++written;
    }
    out[static_cast<long long>(written) * n_rows + r] = static_cast<double>(count);
}

template <typename T>
__global__ void gdi_bin_medians(const T* __restrict__ image,
                                const bool* __restrict__ keep, int has_keep,
                                int ny, int nx,
                                const int* __restrict__ edges, int n_by, int n_bx,
                                double* __restrict__ out)
{
    typedef GdiStKey<T> K;
    typedef typename K::type Key;
    __shared__ Key keys[GDI_ST_MAX_BIN];
    __shared__ int kept;
    const int bx = blockIdx.x, by = blockIdx.y, b = blockIdx.z;
    const int y0 = edges[by], y1 = edges[by + 1];
    const int x0 = edges[n_by + 1 + bx], x1 = edges[n_by + 1 + bx + 1];
    const int width = x1 - x0;
    const int size = (y1 - y0) * width;
    int padded = 1;
    while (padded < size) {
        padded *= 2;
    }
    if (threadIdx.x == 0) {
        kept = 0;
    }
    __syncthreads();
    const long long plane = static_cast<long long>(b) * ny * nx;
    for (int i = threadIdx.x; i < padded; i += blockDim.x) {
        Key key = K::none();
        if (i < size) {
            const long long p = plane + static_cast<long long>(y0 + i / width) * nx + (x0 + i % width);
            if (!has_keep || keep[p]) {
                key = gdi_st_key(image[p]);
                atomicAdd(&kept, 1);
            }
        }
        keys[i] = key;
    }
    __syncthreads();
    // bitonic sort of keys[0 .. padded)
    for (int span = 2; span <= padded; span *= 2) {
        for (int step = span / 2; step > 0; step /= 2) {
            for (int i = threadIdx.x; i < padded; i += blockDim.x) {
                const int j = i ^ step;
                if (j > i) {
                    const bool ascending = (i & span) == 0;
                    const Key a = keys[i], c = keys[j];
                    if ((a > c) == ascending) {
                        keys[i] = c;
                        keys[j] = a;
                    }
                }
            }
            __syncthreads();
        }
    }
    if (threadIdx.x == 0) {
        const int count = kept;
        double median = static_cast<double>(K::nan());
        if (count > 0 && !gdi_st_isnan(static_cast<double>(gdi_st_decode<T>(keys[count - 1])))) {
            const T upper = gdi_st_decode<T>(keys[count / 2]);
            const T lower = gdi_st_decode<T>(keys[(count - 1) / 2]);
            median = static_cast<double>(count % 2 == 1 ? upper : static_cast<T>((lower + upper) / T(2)));
        }
        out[(static_cast<long long>(b) * n_by + by) * n_bx + bx] = median;
    }
}

template __global__ void gdi_bin_medians<float>(const float*, const bool*, int, int, int, const int*, int, int,
                                                double*);
template __global__ void gdi_bin_medians<double>(const double*, const bool*, int, int, int, const int*, int, int,
                                                 double*);

// gdi_bin_sort_keys: the 64-bit sort keys of gpudiffim.statistics.bin_sort_keys
// for a float stack (B, ny, nx), bins between the edges as gdi_bin_medians:
// (bin << 32) | gdi_st_key(value), bin = (b n_by + row bin) n_bx + column bin,
// or B n_by n_bx for a pixel not kept (keep read when has_keep is 1) or
// outside the edges.  A pixel's row and column bins come from a binary search
// of the edges, so no per-pixel label is built on the host.  keys (B ny nx)
// unsigned long long, ready for one sort.  1-D grid-stride loop.
__device__ __forceinline__ int gdi_st_bin_of(const int* __restrict__ edges, int n, int v)
{
    if (v < edges[0] || v >= edges[n]) {
        return -1;
    }
    int low = 0, high = n;   // edges[low] <= v < edges[high]
    while (high - low > 1) {
        const int middle = (low + high) / 2;
        if (edges[middle] <= v) {
            low = middle;
        } else {
            high = middle;
        }
    }
    return low;
}

__global__ void gdi_bin_sort_keys(const float* __restrict__ image,
                                  const bool* __restrict__ keep, int has_keep,
                                  int n_images, int ny, int nx,
                                  const int* __restrict__ edges, int n_by, int n_bx,
                                  unsigned long long* __restrict__ keys)
{
    const long long total = static_cast<long long>(n_images) * ny * nx;
    const unsigned long long excluded = static_cast<unsigned long long>(n_images) * n_by * n_bx;
    const long long stride = static_cast<long long>(blockDim.x) * gridDim.x;
    for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
        const int x = static_cast<int>(i % nx);
        const long long row = i / nx;
        const int y = static_cast<int>(row % ny);
        const int b = static_cast<int>(row / ny);
        const int by = gdi_st_bin_of(edges, n_by, y);
        const int bx = gdi_st_bin_of(edges + n_by + 1, n_bx, x);
        unsigned long long bin = excluded;
        if (by >= 0 && bx >= 0 && (!has_keep || keep[i])) {
            bin = (static_cast<unsigned long long>(b) * n_by + by) * n_bx + bx;
        }
        keys[i] = (bin << 32) | static_cast<unsigned long long>(gdi_st_key(image[i]));
    }
}

// gdi_sorted_bin_medians: the medians of bins 0 .. n_bins - 1 of sorted
// gdi_bin_sort_keys keys (n of them), as gpudiffim.statistics.
// medians_of_sorted_keys: each bin's bounds by binary search of the keys
// (bin << 32), its middle value(s) decoded and an even count averaged in
// float; NaN for an empty bin or one holding a NaN (sorted last).  out
// (n_bins) double.  1-D grid-stride loop over the bins.
__device__ __forceinline__ long long gdi_st_lower_bound(const unsigned long long* __restrict__ keys, long long n,
                                                         unsigned long long key)
{
    long long low = 0, high = n;
    while (low < high) {
        const long long middle = low + (high - low) / 2;
        if (keys[middle] < key) {
            low = middle + 1;
        } else {
            high = middle;
        }
    }
    return low;
}

// The float value of a gdi_bin_sort_keys key (its low word).
__device__ __forceinline__ float gdi_st_key_value(unsigned long long key)
{
    return gdi_st_decode<float>(static_cast<unsigned int>(key & 0xffffffffull));
}

__global__ void gdi_sorted_bin_medians(const unsigned long long* __restrict__ keys, int n, int n_bins,
                                       double* __restrict__ out)
{
    const int stride = blockDim.x * gridDim.x;
    for (int bin = blockIdx.x * blockDim.x + threadIdx.x; bin < n_bins; bin += stride) {
        const long long start = gdi_st_lower_bound(keys, n, static_cast<unsigned long long>(bin) << 32);
        const long long count = gdi_st_lower_bound(keys, n, static_cast<unsigned long long>(bin + 1) << 32) - start;
        double median = GDI_ST_NAN_D;
        if (count > 0 && !gdi_st_isnan(gdi_st_key_value(keys[start + count - 1]))) {
            const float upper = gdi_st_key_value(keys[start + count / 2]);
            const float lower = gdi_st_key_value(keys[start + (count - 1) / 2]);
            median = static_cast<double>(count % 2 == 1 ? upper : (lower + upper) / 2.0f);
        }
        out[bin] = median;
    }
}

// gdi_sky_sources: the pixels of each band (n_bands bands of band_size values)
// beyond `threshold` robust sigmas of the band, as gpudiffim.statistics.
// beyond_robust_level: sigma = scale (q3 - q1) from the band's quartiles
// (quartiles[0, b], quartiles[1, b] of a (k, n_bands) array), 0 if NaN, at
// least `tiny`; out = |residual| >= threshold sigma (0 for NaN residuals).
// int out (0/1), ready for the box dilation.  1-D grid-stride loop.
__global__ void gdi_sky_sources(const double* __restrict__ residual,
                                const double* __restrict__ quartiles,
                                int n_bands, int band_size,
                                double scale, double threshold, double tiny,
                                int* __restrict__ out)
{
    const long long total = static_cast<long long>(n_bands) * band_size;
    const long long stride = static_cast<long long>(blockDim.x) * gridDim.x;
    for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
        const int b = static_cast<int>(i / band_size);
        double sigma = scale * (quartiles[n_bands + b] - quartiles[b]);
        sigma = gdi_st_isnan(sigma) ? 0.0 : sigma;
        const double level = threshold * (sigma > tiny ? sigma : tiny);
        out[i] = fabs(residual[i]) >= level ? 1 : 0;
    }
}

// gdi_sky_value_planes<T>: the noise-correlation planes of sky bands
// (gpudiffim.statistics.sky_value_planes).  Bands (n_bands, height,
// columns); band b's own rows start at shifts[b] (rows_kept of them).  For
// each own pixel: s = sky, z = residual / sqrt(double(s ? variance : 1)),
// kept = s && z finite && |z| < clip; out[0] = kept ? z : 0 and
// out[1] = kept ? 1 : 0, the bands' own rows placed one above the other
// with `gap` zero rows after each: out (2, n_bands (rows_kept + gap),
// columns).  1-D grid-stride loop over one plane.
template <typename T>
__global__ void gdi_sky_value_planes(const double* __restrict__ residual,
                                     const T* __restrict__ variance,
                                     const bool* __restrict__ sky,
                                     const int* __restrict__ shifts,
                                     int n_bands, int height, int columns, int rows_kept, int gap,
                                     double clip,
                                     double* __restrict__ out)
{
    const int out_rows = rows_kept + gap;
    const long long plane = static_cast<long long>(n_bands) * out_rows * columns;
    const long long stride = static_cast<long long>(blockDim.x) * gridDim.x;
    for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < plane; i += stride) {
        const int x = static_cast<int>(i % columns);
        const long long row = i / columns;
        const int b = static_cast<int>(row / out_rows);
        const int r = static_cast<int>(row % out_rows);
        double value = 0.0, weight = 0.0;
        if (r < rows_kept) {
            const long long p = (static_cast<long long>(b) * height + shifts[b] + r) * columns + x;
            const bool s = sky[p];
            const double z = residual[p] / sqrt(static_cast<double>(s ? variance[p] : T(1)));
            if (s && isfinite(z) && fabs(z) < clip) {
                value = z;
                weight = 1.0;
            }
        }
        out[i] = value;
        out[plane + i] = weight;
    }
}

template __global__ void gdi_sky_value_planes<float>(const double*, const float*, const bool*, const int*, int, int,
                                                     int, int, int, double, double*);
template __global__ void gdi_sky_value_planes<double>(const double*, const double*, const bool*, const int*, int,
                                                      int, int, int, int, double, double*);

// gdi_subtract_mean: planes (2, n) of gdi_sky_value_planes, sums = (sum of
// plane 0, sum of plane 1): plane 0 becomes weight > 0 ? value - sums[0] /
// sums[1] : 0, in place (gpudiffim.statistics.subtract_sky_mean).
__global__ void gdi_subtract_mean(double* __restrict__ planes, int n, const double* __restrict__ sums)
{
    const double mean = sums[0] / sums[1];
    const long long stride = static_cast<long long>(blockDim.x) * gridDim.x;
    for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
        planes[i] = planes[static_cast<long long>(n) + i] > 0.0 ? planes[i] - mean : 0.0;
    }
}

// gdi_correlation_near: the lags |dy|, |dx| <= far of circular
// correlations (P, rows, columns): out[p, far + dy, far + dx] =
// correlation[p, dy mod rows, dx mod columns] (gpudiffim.statistics.
// near_lags), then `extra` values appended (the sky count).  One thread per
// output value.
__global__ void gdi_correlation_near(const double* __restrict__ correlation, int n_planes, int rows, int columns,
                                     int far, const double* __restrict__ extra, int n_extra,
                                     double* __restrict__ out)
{
    const int size = 2 * far + 1;
    const int n_near = n_planes * size * size;
    const int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
    if (i < n_near) {
        const int p = i / (size * size);
        const int dy = (i / size) % size - far;
        const int dx = i % size - far;
        const int y = dy < 0 ? dy + rows : dy;
        const int x = dx < 0 ? dx + columns : dx;
        out[i] = correlation[(static_cast<long long>(p) * rows + y) * columns + x];
    } else if (i < n_near + n_extra) {
        out[i] = extra[i - n_near];
    }
}

// gdi_gather_rows<T>: windows of `height` rows of a plane (ny, nx) starting
// at rows windows[0 .. n_windows), written to out[first + w] of a stack
// (out (n_out, height, nx)): the sampled bands of gpudiffim.variance.
// sampled_stack (a row gather, plane[index]).  1-D grid-stride loop.
template <typename T>
__global__ void gdi_gather_rows(const T* __restrict__ plane, int ny, int nx,
                                const int* __restrict__ windows, int n_windows, int height, int first,
                                T* __restrict__ out)
{
    const long long total = static_cast<long long>(n_windows) * height * nx;
    const long long stride = static_cast<long long>(blockDim.x) * gridDim.x;
    for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
        const long long row = i / nx;
        const int w = static_cast<int>(row / height);
        const int r = static_cast<int>(row % height);
        out[static_cast<long long>(first) * height * nx + i] =
            plane[static_cast<long long>(windows[w] + r) * nx + i % nx];
    }
    (void)ny;
}

template __global__ void gdi_gather_rows<float>(const float*, int, int, const int*, int, int, int, float*);
template __global__ void gdi_gather_rows<double>(const double*, int, int, const int*, int, int, int, double*);
template __global__ void gdi_gather_rows<int>(const int*, int, int, const int*, int, int, int, int*);

// gdi_sky_normalised<T>: the normalised sky values of the variance
// correction (gpudiffim.statistics.normalised_sky_values): bands (n_bands,
// height, columns) of n_images images stacked, band b of each image owning
// rows shifts[b] .. shifts[b] + rows_kept - 1; selected = sky on an own row,
// values = selected ? residual / sqrt(double(variance)) : +inf (ready for the
// sort of gdi_sorted_quantiles).  1-D grid-stride loop over every pixel.
template <typename T>
__global__ void gdi_sky_normalised(const double* __restrict__ residual,
                                   const T* __restrict__ variance,
                                   const bool* __restrict__ sky,
                                   const int* __restrict__ shifts,
                                   int n_bands, int n_total, int height, int columns, int rows_kept,
                                   double* __restrict__ values, bool* __restrict__ selected)
{
    const long long total = static_cast<long long>(n_total) * height * columns;
    const long long stride = static_cast<long long>(blockDim.x) * gridDim.x;
    for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
        const long long row = i / columns;
        const int b = static_cast<int>((row / height) % n_bands);
        const int r = static_cast<int>(row % height) - shifts[b];
        const bool keep = sky[i] && r >= 0 && r < rows_kept;
        selected[i] = keep;
        values[i] = keep ? residual[i] / sqrt(static_cast<double>(variance[i])) : GDI_ST_INF_D;
    }
}

template __global__ void gdi_sky_normalised<float>(const double*, const float*, const bool*, const int*, int, int, int,
                                                   int, int, double*, bool*);
template __global__ void gdi_sky_normalised<double>(const double*, const double*, const bool*, const int*, int, int,
                                                    int, int, int, double*, bool*);
