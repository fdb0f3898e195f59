// The collapse session of a generation run: every call collapse_llama2c makes into the engine's C
// API (include/collapse/collapse.h) is in monitor.cpp.
#pragma once
#include <cstdint>
#include <string>

#include "engine.hpp"

namespace llama2c {

class Monitor {
public:
    // Options from `config_path` (or the defaults when empty) with num_classes = V, dim = d of the
    // model and the given backend; the classifier is the model's wcls. Throws std::runtime_error.
    Monitor(const Model& model, const std::string& config_path, collapse_backend backend);
    ~Monitor();
    Monitor(const Monitor&) = delete;
    Monitor& operator=(const Monitor&) = delete;

    // n rows: features [n, d] float32 and labels [n] int32, both in `memory` (device buffers on
    // `stream` with CUDA); sequence ids and positions are host arrays.
    void ingest(const float* features, const int32_t* labels, collapse_memory memory, int n, const int32_t* sequence_ids,
                const int64_t* positions, void* stream);
    int64_t rows() const { return rows_; }
    // Wall-clock seconds spent inside the ingest calls (on CUDA: queueing them, not the device work).
    double ingest_seconds() const { return ingest_seconds_; }
    // One status line from a snapshot of the rows so far.
    std::string snapshot_line();
    // Final compute; writes the JSON report to `output` when non-empty. Returns counts.rows_kept.
    int64_t finish(const std::string& output);

private:
    collapse_session* session_ = nullptr;
    int64_t dim_ = 0, rows_ = 0;
    double ingest_seconds_ = 0;
};

}  // namespace llama2c
