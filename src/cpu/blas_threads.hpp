// OpenBLAS (the pthreads build) on one thread for a scope.
#pragma once
#include <cblas.h>

namespace collapse::internal {

// For phases where our own threads each call BLAS on small matrices, or where BLAS's calls are
// too small to split: its threads only spin there (measured: per-token SVDs at d = 1024 ran faster
// on one thread than on two; a dsyrk of 256 rows at d = 64 woke a worker that then spun in
// sched_yield beside the ingest's two threads). The count is process-wide, so it is restored when
// the scope ends; set it only outside parallel regions.
class OneBlasThread {
public:
    explicit OneBlasThread(bool on) : before_(on ? openblas_get_num_threads() : 0) {
        if (before_ > 1) openblas_set_num_threads(1);
    }
    ~OneBlasThread() {
        if (before_ > 1) openblas_set_num_threads(before_);
    }
    OneBlasThread(const OneBlasThread&) = delete;
    OneBlasThread& operator=(const OneBlasThread&) = delete;

private:
    int before_;
};

}  // namespace collapse::internal
