// The session's stream, handles and workspace pool (resources.cuh).
#include "resources.cuh"

namespace collapse::internal::cuda {

Resources::Resources(int device, int64_t budget_limit, bool allow_tf32, std::shared_ptr<HostBudget> host)
    : device_(device), host_(std::move(host)), budget_(budget_limit), pool_(&budget_) {
    DeviceGuard guard(device);  // the stream and the handles belong to the session's device
    try {
        COLLAPSE_CUDA_TRY(cudaStreamCreateWithFlags(&stream_, cudaStreamDefault));
        COLLAPSE_CUBLAS_TRY(cublasCreate(&cublas_));
        COLLAPSE_CUBLAS_TRY(cublasSetMathMode(cublas_, allow_tf32 ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_DEFAULT_MATH));
        COLLAPSE_CUSOLVER_TRY(cusolverDnCreate(&cusolver_));
        COLLAPSE_CUSOLVER_TRY(cusolverDnCreateParams(&solver_params_));
    } catch (...) {
        release();
        throw;
    }
}

Resources::~Resources() {
    int previous = 0;
    (void)cudaGetDevice(&previous);
    (void)cudaSetDevice(device_);
    release();
    pool_.trim(budget_.cached());  // while the session's device is current
    (void)cudaSetDevice(previous);
}

void Resources::release() noexcept {
    if (stream_) COLLAPSE_CUDA_TRY_NO_THROW(cudaStreamSynchronize(stream_));
    if (solver_params_) cusolverDnDestroyParams(solver_params_);
    if (cusolver_) cusolverDnDestroy(cusolver_);
    if (cublas_) cublasDestroy(cublas_);
    if (stream_) COLLAPSE_CUDA_TRY_NO_THROW(cudaStreamDestroy(stream_));
    solver_params_ = nullptr;
    cusolver_ = nullptr;
    cublas_ = nullptr;
    stream_ = nullptr;
}

cublasHandle_t Resources::blas(cudaStream_t s) {
    COLLAPSE_CUBLAS_TRY(cublasSetStream(cublas_, s));
    return cublas_;
}

cusolverDnHandle_t Resources::solver(cudaStream_t s) {
    COLLAPSE_CUSOLVER_TRY(cusolverDnSetStream(cusolver_, s));
    return cusolver_;
}

}  // namespace collapse::internal::cuda
