// The one translation unit that compiles the CUDA engine's kernels: the launchers of
// kernels.cuh, explicitly instantiated for every cell x storage type. No torch header here,
// so tests/test_cuda_compile.py compiles this very file with nvcc alone.
#include "kernels.cuh"

namespace rnnfast {
namespace cuda {

#define RNNFAST_CUDA_DEFINE_CELL(Cell, T) RNNFAST_CUDA_CELL_LAUNCHERS(, Cell, T)
#define RNNFAST_CUDA_DEFINE_TYPE(T)         \
  RNNFAST_CUDA_TYPE_LAUNCHERS(, T)          \
  RNNFAST_CUDA_FOR_EACH_CELL_OF_TYPE(RNNFAST_CUDA_DEFINE_CELL, T)

RNNFAST_CUDA_FOR_EACH_TYPE(RNNFAST_CUDA_DEFINE_TYPE)

}  // namespace cuda
}  // namespace rnnfast
