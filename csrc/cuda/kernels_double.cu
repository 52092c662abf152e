// The CUDA engine's kernels for double storage: every launcher of launchers.cuh (the cell
// options' too), explicitly instantiated for every cell. One translation unit per storage type
// (kernels_<type>.cu), so the build compiles the four in parallel; no torch header here, so
// tests/test_cuda_compile.py compiles these very files with nvcc alone.
#include "launchers.cuh"

namespace rnnfast {
namespace cuda {

RNNFAST_CUDA_DEFINE_TYPE(double)
RNNFAST_CUDA_DEFINE_OPTIONS_TYPE(double)

}  // namespace cuda
}  // namespace rnnfast
