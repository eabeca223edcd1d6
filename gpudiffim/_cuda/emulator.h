// CPU emulation of the small CUDA subset used by kernels/*.cu, for g++ -std=c++20.
//
// gpudiffim/_cuda/emulator.py concatenates this header, the kernel source and a
// generated launch shim into one translation unit (no -I), builds a shared
// library and calls it through ctypes.  A launch runs blockDim host threads
// (one per CUDA thread of a block); they execute the blocks of the grid in
// sequence, with a barrier between blocks, so __shared__ (a function-local
// static, one per template instantiation) is block-shared storage and
// __syncthreads() is a std::barrier across the block.  Supported: 1-D, 2-D and
// 3-D grids and blocks, __shared__ arrays of static size, __syncthreads,
// atomicAdd on int, unsigned, unsigned long long, float and double, atomicMax
// on integers (a compare-and-swap loop).  Not supported: warp intrinsics,
// dynamic (extern) shared memory, __syncthreads in divergent code (a deadlock
// here, undefined behaviour on a GPU).

#include <atomic>
#include <barrier>
#include <cmath>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

struct uint3 {
    unsigned int x, y, z;
};
struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline dim3 blockDim;
inline dim3 gridDim;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)

using std::isfinite;
using std::sqrt;

namespace gdi_emu {
inline std::barrier<>* block_barrier = nullptr;
inline std::mutex launch_mutex;  // one emulated launch at a time (__shared__ is static)
}  // namespace gdi_emu

inline void __syncthreads() { gdi_emu::block_barrier->arrive_and_wait(); }

template <typename T>
inline T atomicAdd(T* address, T value)
{
    return std::atomic_ref<T>(*address).fetch_add(value);
}

template <typename T>
inline T atomicMax(T* address, T value)
{
    std::atomic_ref<T> target(*address);
    T old = target.load();
    while (old < value && !target.compare_exchange_weak(old, value)) {
    }
    return old;
}

namespace gdi_emu {

// Run `body` (which calls the kernel) on grid x block; 0 on success, 2 on a
// bad geometry.  Kernels must not throw (a throw terminates the process).
inline int launch(dim3 grid, dim3 block, const std::function<void()>& body)
{
    const unsigned long long nthreads = 1ull * block.x * block.y * block.z;
    if (nthreads == 0 || nthreads > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0) {
        return 2;
    }
    std::lock_guard<std::mutex> guard(launch_mutex);
    gridDim = grid;
    blockDim = block;
    std::barrier<> barrier(static_cast<std::ptrdiff_t>(nthreads));
    block_barrier = &barrier;
    auto worker = [&](unsigned int t) {
        threadIdx = uint3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
        for (unsigned int bz = 0; bz < grid.z; ++bz) {
            for (unsigned int by = 0; by < grid.y; ++by) {
                for (unsigned int bx = 0; bx < grid.x; ++bx) {
                    blockIdx = uint3{bx, by, bz};
                    body();
                    barrier.arrive_and_wait();  // the next block may reuse __shared__
                }
            }
        }
    };
    std::vector<std::thread> threads;
    threads.reserve(nthreads);
    for (unsigned int t = 0; t < nthreads; ++t) {
        threads.emplace_back(worker, t);
    }
    for (auto& th : threads) {
        th.join();
    }
    block_barrier = nullptr;
    return 0;
}

}  // namespace gdi_emu
