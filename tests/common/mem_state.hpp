// Sections in memory, as src/mpi/ moves them between ranks: a state writer and reader for tests of
// the parts' layouts and of a backend's own save_state / load_state.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "base/error.hpp"
#include "core/state_io.hpp"

namespace testutil {

class MemState final : public collapse::internal::StateWriter, public collapse::internal::StateReader {
public:
    void add(const std::string& n, uint32_t t, const std::vector<int64_t>& shape, const void* data, size_t bytes) override {
        Sec& s = secs_[n];
        s.t = t, s.shape = shape;
        s.b.assign(static_cast<const uint8_t*>(data), static_cast<const uint8_t*>(data) + bytes);
    }
    void begin_section(const std::string& n, uint32_t t, const std::vector<int64_t>& shape, size_t) override { add(n, t, shape, nullptr, 0), cur_ = n; }
    void append(const void* data, size_t bytes) override {
        auto& b = secs_[cur_].b;
        b.insert(b.end(), static_cast<const uint8_t*>(data), static_cast<const uint8_t*>(data) + bytes);
    }
    void end_section() override {}
    std::string description() const override { return "a test part"; }
    bool has(const std::string& n) const override { return secs_.count(n) > 0; }
    collapse::internal::StateSection section(const std::string& n) const override {
        const auto it = secs_.find(n);
        if (it == secs_.end()) collapse::internal::fail(COLLAPSE_ERR_IO, "no section ", n);
        collapse::internal::StateSection s;
        s.name = n, s.dtype_code = it->second.t, s.shape = it->second.shape, s.bytes = it->second.b.size();
        s.data = s.bytes ? it->second.b.data() : nullptr;
        return s;
    }
    template <class T>
    T* at(const std::string& n) { return reinterpret_cast<T*>(secs_.at(n).b.data()); }
    template <class T>
    std::vector<T> values(const std::string& n) const {
        const std::vector<uint8_t>& b = secs_.at(n).b;
        return std::vector<T>(reinterpret_cast<const T*>(b.data()), reinterpret_cast<const T*>(b.data() + b.size()));
    }
    void reshape(const std::string& n, std::vector<int64_t> shape) { secs_.at(n).shape = std::move(shape); }

private:
    struct Sec {
        uint32_t t = 0;
        std::vector<int64_t> shape;
        std::vector<uint8_t> b;
    };
    std::map<std::string, Sec> secs_;
    std::string cur_;
};

}  // namespace testutil
