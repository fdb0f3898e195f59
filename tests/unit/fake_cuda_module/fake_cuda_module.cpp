// A stand-in for libcollapse_cuda.so, built the same way (collapse_add_backend_module: its own
// local copy of the core, only the entry points exported), so that the registry's paths run on
// machines without CUDA (tests/unit/test_backend_registry.cpp):
//  - FAKE_CUDA_NO_DEVICE set: the module loads but reports no device;
//  - num_classes == 13: the factory throws; otherwise every Backend method throws
//    collapse::internal::Error (ingest: COLLAPSE_ERR_BAD_INPUT; sync: COLLAPSE_ERR_OUT_OF_MEMORY)
//    from inside this module, to be caught by the C API of the library that loaded it.
#include <cstdio>
#include <cstdlib>
#include <type_traits>

#include "base/error.hpp"
#include "core/backend_module.hpp"

namespace {

using namespace collapse::internal;

class FakeBackend final : public Backend {
public:
    const char* name() const override { return "fake-cuda"; }
    void ingest(const BatchDesc& b, void*) override {
        fail(COLLAPSE_ERR_BAD_INPUT, "fake cuda module: refused a batch of ", b.num_rows(), " rows");
    }
    Counts row_counts() override { return {}; }
    std::vector<int64_t> class_counts() override { return {}; }
    void sync() override { fail(COLLAPSE_ERR_OUT_OF_MEMORY, "fake cuda module: device out of memory"); }
    bool has_row_store() const override { return false; }
    void begin_second_pass(const KeptSet&, const Classifier&, bool, bool) override { refuse("begin_second_pass"); }
    void ingest_second_pass(const BatchDesc&, void*) override { refuse("ingest_second_pass"); }
    MetricValues compute(const KeptSet&, const Classifier&) override { refuse("compute"); }
    void save_state(StateWriter&) override { refuse("save_state"); }
    void load_state(const StateReader&, bool) override { refuse("load_state"); }

private:
    [[noreturn]] static void refuse(const char* what) { fail(COLLAPSE_ERR_INTERNAL, "fake cuda module: ", what); }
};

}  // namespace

extern "C" {

int collapse_cuda_module_available(char* why, size_t n) {
    if (!std::getenv("FAKE_CUDA_NO_DEVICE")) return 1;
    std::snprintf(why, n, "cudaErrorNoDevice: no CUDA-capable device is detected (fake)");
    return 0;
}

Backend* collapse_cuda_module_create_v2(const char*, size_t, const Config*, int64_t num_classes, int64_t,
                                        const std::shared_ptr<HostBudget>*) {
    if (num_classes == 13) fail(COLLAPSE_ERR_INVALID_ARGUMENT, "fake cuda module: num_classes 13 refused by the factory");
    return new FakeBackend();
}

}  // extern "C"

static_assert(std::is_same_v<decltype(&collapse_cuda_module_create_v2), collapse_cuda_module_create_fn>);
