// The one portability header: everything that differs between CUDA (nvcc), HIP (hipcc, AMD) and a plain host
// compiler (the CPU loops, the torch binding) is decided here, so kernels and loops stay free of #ifdefs.
//
//   OF_HD / OF_DEVICE      function qualifiers (plain `inline` for a host compiler)
//   OF_DEVICE_PASS         defined while device code is being compiled
//   OF_WARP_SIZE           32 on NVIDIA, the wavefront size (64 on MI250X) on AMD
//   OF_LAUNCH, OF_DYNAMIC_SHARED   a kernel launch, a kernel's dynamic shared memory
//   shfl_xor, launch bounds, runtime API names (gpuStream_t, gpuGetLastError, ...), 16-byte vector type.
// A third target, the CPU emulation of the GPU kernels (OLMO_FAST_EMULATION; csrc/emulation/emulated_gpu.h),
// compiles the same kernel sources with a host compiler: threads of a block as host threads, warp size
// OLMO_FAST_EMULATED_WARP_SIZE (32 or 64).
#pragma once

#include <stdint.h>

#if defined(__HIPCC__)
#include <hip/hip_fp16.h>
#include <hip/hip_runtime.h>
#define OF_GPU 1
#define OF_HIP 1
#elif defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define OF_GPU 1
#define OF_CUDA 1
#elif defined(OLMO_FAST_EMULATION)
#include "emulated_gpu.h"
#define OF_GPU 1
#define OF_EMULATED 1
#endif

#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
#define OF_DEVICE_PASS 1
#endif

#if defined(OF_EMULATED)
#define OF_HD inline
#define OF_DEVICE inline
#define OF_RESTRICT __restrict__
#elif defined(OF_GPU)
#define OF_HD __host__ __device__ __forceinline__
#define OF_DEVICE __device__ __forceinline__
#define OF_RESTRICT __restrict__
#else
#define OF_HD inline
#define OF_RESTRICT __restrict__
#endif

namespace olmo_fast {

// A 16-byte (or narrower) bundle of N elements, loaded and stored as one memory transaction.
template <class T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

}  // namespace olmo_fast

#ifdef OF_GPU

#if defined(OF_EMULATED)
#define OF_WARP_SIZE OLMO_FAST_EMULATED_WARP_SIZE
typedef void* gpuStream_t;
typedef int gpuError_t;
#define gpuSuccess 0
#define gpuGetLastError ::olmo_fast::emu::last_error
#define gpuGetErrorString ::olmo_fast::emu::error_string
#define gpuGetDevice ::olmo_fast::emu::get_device
#define gpuDeviceGetAttribute ::olmo_fast::emu::device_attribute
#define gpuDevAttrMultiProcessorCount ::olmo_fast::emu::kMultiprocessorCount
#define gpuErrorInvalidValue 1
#elif defined(OF_HIP)
#if defined(__AMDGCN_WAVEFRONT_SIZE__)
#define OF_WARP_SIZE __AMDGCN_WAVEFRONT_SIZE__
#elif defined(__AMDGCN_WAVEFRONT_SIZE)
#define OF_WARP_SIZE __AMDGCN_WAVEFRONT_SIZE
#else
#define OF_WARP_SIZE 64  // host pass: the widest wavefront, only used for shared-memory sizing
#endif
typedef hipStream_t gpuStream_t;
typedef hipError_t gpuError_t;
#define gpuSuccess hipSuccess
#define gpuGetLastError hipGetLastError
#define gpuGetErrorString hipGetErrorString
#define gpuGetDevice hipGetDevice
#define gpuDeviceGetAttribute hipDeviceGetAttribute
#define gpuDevAttrMultiProcessorCount hipDeviceAttributeMultiprocessorCount
#define gpuErrorInvalidValue hipErrorInvalidValue
#else
#define OF_WARP_SIZE 32
typedef cudaStream_t gpuStream_t;
typedef cudaError_t gpuError_t;
#define gpuSuccess cudaSuccess
#define gpuGetLastError cudaGetLastError
#define gpuGetErrorString cudaGetErrorString
#define gpuGetDevice cudaGetDevice
#define gpuDeviceGetAttribute cudaDeviceGetAttribute
#define gpuDevAttrMultiProcessorCount cudaDevAttrMultiProcessorCount
#define gpuErrorInvalidValue cudaErrorInvalidValue
#endif

// Every launch uses at most this many threads per block: 16 wavefronts of 64 or 32 warps of 32.
#define OF_MAX_THREADS 1024
#define OF_LAUNCH_BOUNDS __launch_bounds__(OF_MAX_THREADS)

// OF_LAUNCH(grid, block, shared_bytes, stream, kernel)(args): kernel<<<grid, block, shared_bytes, stream>>>(args),
// or the emulator's launch. The kernel comes last: a template-id's commas stay inside __VA_ARGS__.
// OF_DYNAMIC_SHARED(T, name): `name`, the T array in the launch's dynamic shared memory.
#if defined(OF_EMULATED)
#define OF_LAUNCH(grid, block, shared_bytes, stream, ...) \
  ::olmo_fast::emu::launch(grid, block, shared_bytes, stream, __VA_ARGS__)
#define OF_DYNAMIC_SHARED(T, name) T* const name = ::olmo_fast::emu::dynamic_shared<T>()
#else
#define OF_LAUNCH(grid, block, shared_bytes, stream, ...) __VA_ARGS__<<<grid, block, shared_bytes, stream>>>
#define OF_DYNAMIC_SHARED(T, name) extern __shared__ T name[]
#endif

namespace olmo_fast {

OF_DEVICE float shfl_xor(float v, int lane_mask) {
#if defined(OF_EMULATED)
  return emu::shfl_xor(v, lane_mask);
#elif defined(OF_HIP)
  return __shfl_xor(v, lane_mask, OF_WARP_SIZE);
#else
  return __shfl_xor_sync(0xffffffffu, v, lane_mask, OF_WARP_SIZE);
#endif
}

}  // namespace olmo_fast

#endif  // OF_GPU
