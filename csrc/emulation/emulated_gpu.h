// CPU emulation of the CUDA/HIP execution model, so that the GPU kernels of csrc/kernels/*.cu run (and are
// tested against float64) on a machine without a GPU. portability.h includes this header when the sources are
// compiled by a host compiler with -DOLMO_FAST_EMULATION -DOLMO_FAST_EMULATED_WARP_SIZE=32 (or 64) and
// -Icsrc/emulation; the kernels' code is unchanged, and their C ABI launchers (kernels.h) run them.
//
// Compile with -Wno-unknown-pragmas (the kernels' `#pragma unroll` is the GPU compilers').
// What is emulated:
//   - a launch (OF_LAUNCH) runs the grid's blocks one after another; a block's threads are host threads, each
//     with its own threadIdx / blockIdx / blockDim / gridDim (thread_local);
//   - __syncthreads: a barrier of the block's threads; `__shared__` variables are function statics (one copy,
//     seen by every thread of the block: blocks never overlap); dynamic shared memory (OF_DYNAMIC_SHARED) is a
//     zeroed buffer of the launch's size per block;
//   - warp shuffles (shfl_xor): warp w is threads [w W, (w + 1) W) of the block's linear thread index, W the
//     emulated warp size; each lane publishes its value, the warp meets at a barrier, reads its partner's, and
//     meets again before the slots are reused;
//   - gpuGetLastError: a bad launch configuration (no thread, more than OF_MAX_THREADS) is reported, as the
//     runtime would, and the launch does not run; gpuGetDevice / gpuDeviceGetAttribute: one device of 132
//     multiprocessors;
//   - the tensor-core matrix instructions (csrc/kernels/mma.cuh): warp_gather hands each lane the fragments of its
//     warp, from which mma.cuh forms the product by the instructions' documented fragment layouts;
// Not emulated: concurrency between blocks, atomics, memory ordering beyond the barriers; device math is the host's
// libm (sincosf, expf, logf) and the kernels' own formulas.
#pragma once

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#ifndef OLMO_FAST_EMULATED_WARP_SIZE
#error "define OLMO_FAST_EMULATED_WARP_SIZE (32 or 64) to emulate the GPU kernels"
#endif

#define __global__
#define __device__
#define __host__
#define __shared__ static
#define __launch_bounds__(threads)

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline thread_local dim3 threadIdx(0, 0, 0);
inline thread_local dim3 blockIdx(0, 0, 0);
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }

namespace olmo_fast {
namespace emu {

// A reusable barrier of n threads (generation-counted).
class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const uint64_t generation = generation_;
    if (++arrived_ == n_) {
      arrived_ = 0;
      ++generation_;
      done_.notify_all();
      return;
    }
    done_.wait(lock, [&] { return generation_ != generation; });
  }

 private:
  std::mutex mutex_;
  std::condition_variable done_;
  int n_, arrived_ = 0;
  uint64_t generation_ = 0;
};

// What the threads of the running block share: their barriers, the shuffle slots, the dynamic shared memory.
struct BlockState {
  BlockState(int threads, size_t shared_bytes)
      : block(threads), lanes(threads), exchange(size_t(threads) * kMaxExchange), shared((shared_bytes + sizeof(max_align_t) - 1) / sizeof(max_align_t)) {
    constexpr int W = OLMO_FAST_EMULATED_WARP_SIZE;
    for (int first = 0; first < threads; first += W) {
      warps.emplace_back(new Barrier(threads - first < W ? threads - first : W));
    }
  }
  Barrier block;
  std::vector<std::unique_ptr<Barrier>> warps;
  static constexpr int kMaxExchange = 32;  // floats per lane that warp_gather moves
  std::vector<float> lanes;
  std::vector<float> exchange;
  std::vector<max_align_t> shared;
};

inline thread_local BlockState* block_state = nullptr;
inline int launch_error = 0;

inline int last_error() {
  const int error = launch_error;
  launch_error = 0;
  return error;
}

inline const char* error_string(int error) { return error == 0 ? "no error" : "invalid launch configuration"; }

// One device, device 0, with an H100 SXM's 132 multiprocessors.
enum DeviceAttribute { kMultiprocessorCount };
inline int get_device(int* device) {
  *device = 0;
  return 0;
}
inline int device_attribute(int* value, DeviceAttribute attribute, int device) {
  if (device != 0 || attribute != kMultiprocessorCount) return 1;
  *value = 132;
  return 0;
}

inline int linear_thread() { return int(threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)); }

template <class T>
T* dynamic_shared() {
  return reinterpret_cast<T*>(block_state->shared.data());
}

inline float shfl_xor(float v, int lane_mask) {
  constexpr int W = OLMO_FAST_EMULATED_WARP_SIZE;
  BlockState& b = *block_state;
  const int t = linear_thread(), first = t - t % W;
  Barrier& warp = *b.warps[t / W];
  b.lanes[t] = v;
  warp.wait();
  const float other = b.lanes[first + ((t - first) ^ lane_mask)];
  warp.wait();
  return other;
}

// The warp's exchange for the tensor-core instructions: every lane publishes its n floats `mine` (n <= 32), and
// receives all[l * n + j] = lane l's mine[j] for the lanes l of its warp.
inline void warp_gather(const float* mine, int n, float* all) {
  constexpr int W = OLMO_FAST_EMULATED_WARP_SIZE;
  BlockState& b = *block_state;
  const int t = linear_thread(), first = t - t % W;
  Barrier& warp = *b.warps[t / W];
  for (int j = 0; j < n; ++j) b.exchange[size_t(t) * BlockState::kMaxExchange + j] = mine[j];
  warp.wait();
  for (int l = 0; l < W; ++l) {
    for (int j = 0; j < n; ++j) all[l * n + j] = b.exchange[size_t(first + l) * BlockState::kMaxExchange + j];
  }
  warp.wait();
}

// OF_LAUNCH's emulation: launch(grid, block, shared_bytes, kernel)(args...).
template <class... Params>
struct Launch {
  dim3 grid, block;
  size_t shared_bytes;
  void (*kernel)(Params...);

  template <class... Args>
  void operator()(const Args&... args) const {
    const long threads = long(block.x) * block.y * block.z;
    if (threads <= 0 || threads > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0) {
      launch_error = 1;
      return;
    }
    for (unsigned bz = 0; bz < grid.z; ++bz) {
      for (unsigned by = 0; by < grid.y; ++by) {
        for (unsigned bx = 0; bx < grid.x; ++bx) {
          BlockState state(int(threads), shared_bytes);
          std::vector<std::thread> pool;
          pool.reserve(size_t(threads));
          for (long t = 0; t < threads; ++t) {
            pool.emplace_back([&, t, bx, by, bz] {
              threadIdx = dim3(unsigned(t % block.x), unsigned(t / block.x % block.y),
                               unsigned(t / (long(block.x) * block.y)));
              blockIdx = dim3(bx, by, bz);
              blockDim = block;
              gridDim = grid;
              block_state = &state;
              kernel(args...);
            });
          }
          for (std::thread& th : pool) th.join();
        }
      }
    }
  }
};

// The stream is accepted and ignored: launches run to completion in order.
template <class... Params>
Launch<Params...> launch(dim3 grid, dim3 block, size_t shared_bytes, void* /*stream*/, void (*kernel)(Params...)) {
  return Launch<Params...>{grid, block, shared_bytes, kernel};
}

}  // namespace emu
}  // namespace olmo_fast

inline void __syncthreads() { olmo_fast::emu::block_state->block.wait(); }
