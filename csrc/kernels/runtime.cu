// What the callers of the C ABI ask the GPU runtime: its error strings (the torch binding reports them in its
// errors) and the current device's multiprocessor count (launch plans that spread work over all of them).
#include "common.cuh"

extern "C" const char* olmo_fast_gpu_error_string(int error) { return gpuGetErrorString(gpuError_t(error)); }

extern "C" int olmo_fast_gpu_multiprocessors(void) {
  int device = 0, count = 0;
  if (gpuGetDevice(&device) != gpuSuccess) return 0;
  return gpuDeviceGetAttribute(&count, gpuDevAttrMultiProcessorCount, device) == gpuSuccess ? count : 0;
}
