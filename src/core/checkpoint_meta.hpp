// What a saved state says about the session that saved it, besides its arrays: V, d, the
// configuration, the classifier's identity and the input position. A plain struct: the checkpoint
// file stores it as JSON (src/io/session_checkpoint.cpp), core only compares and takes it in.
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "core/backend.hpp"
#include "core/config.hpp"

namespace collapse::internal {

struct CheckpointMeta {
    int64_t num_classes = 0;
    int64_t dim = 0;
    std::string backend;          // the backend that saved (information only)
    Config config;                // the saving session's whole configuration
    std::string classifier_hash;  // "" = no classifier known
    int64_t batches_failed = 0;
    int64_t input_position = 0;   // input row (or sequence) after the last accepted batch
    int64_t batches = 0;
    int64_t rows_before_backend = 0;
    // Batches skipped under continue_on_error: their rows and input ranges [first, end).
    int64_t rows_skipped = 0;
    std::vector<std::pair<int64_t, int64_t>> skipped_ranges;
    std::string input_identity;  // what the rows came from (driver's JSON text); "" = unknown
};

// The configuration keys whose value changes what is accumulated: a state can only continue or
// merge into a session that agrees on all of them (finalisation options such as cdnv_power may
// differ).
const std::vector<std::string>& state_config_keys();

// The first state-affecting key other than dim (V and d are compared on their own) on which a and
// b differ, with both values as text; false when they agree.
bool state_config_differs(const Config& a, const Config& b, std::string* key, std::string* value_a, std::string* value_b);

// FNV-1a over the classifier's doubles: enough to tell two classifiers apart.
uint64_t classifier_hash(const Classifier& clf);

}  // namespace collapse::internal
