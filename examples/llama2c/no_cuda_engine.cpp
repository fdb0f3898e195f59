// Builds without CUDA: the CUDA engine (cuda_engine.cu) is absent.
#include <stdexcept>

#include "engine.hpp"

namespace llama2c {

std::unique_ptr<Engine> make_cuda_engine(const Model&, int) {
    throw std::runtime_error("this build of collapse_llama2c has no CUDA engine (configure the project with CUDA)");
}
bool cuda_engine_built() { return false; }

}  // namespace llama2c
