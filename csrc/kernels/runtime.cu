// The GPU runtime's error strings, for callers of the C ABI (the torch binding reports them in its errors).
#include "common.cuh"

extern "C" const char* olmo_fast_gpu_error_string(int error) { return gpuGetErrorString(gpuError_t(error)); }
