// Threads and the C API (collapse.h, "Threads"): overlapping calls on one session are refused with
// COLLAPSE_ERR_STATE instead of corrupting it, and a destroy that overlaps a call frees nothing.
// "Not corrupted" is proven, not assumed: the report of the hammered session equals the report of a
// session that ingested the same batch as many times as the hammered one accepted it, one thread.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "collapse/collapse.h"
#include "common/capi_helpers.hpp"
#include "common/compare.hpp"

namespace test_threads {
namespace {

using testutil::SessionPtr;

constexpr int64_t kV = 64;

collapse_session* new_session(collapse_svd_mode mode = COLLAPSE_SVD_EXACT) {
    collapse_options o;
    EXPECT_EQ(collapse_options_default(&o), COLLAPSE_OK);
    o.num_classes = kV;
    o.svd_mode = mode;
    collapse_session* s = nullptr;
    EXPECT_EQ(collapse_session_create(&o, &s), COLLAPSE_OK) << collapse_last_error();
    return s;
}

struct Batch {
    int64_t n, d;
    std::vector<float> x;
    std::vector<int32_t> y;
    Batch(int64_t n_, int64_t d_) : n(n_), d(d_), x((size_t)(n_ * d_)), y((size_t)n_) {
        std::mt19937 rng(7);
        std::normal_distribution<float> g;
        for (auto& v : x) v = g(rng);
        for (int64_t i = 0; i < n; ++i) y[(size_t)i] = (int32_t)(i % kV);
    }
    collapse_status ingest(collapse_session* s) const {
        const collapse_buffer f{x.data(), COLLAPSE_F32, COLLAPSE_MEMORY_HOST, n, d, 0};
        const collapse_buffer l{y.data(), COLLAPSE_I32, COLLAPSE_MEMORY_HOST, n, 1, 0};
        return collapse_session_ingest_rows(s, &f, &l, nullptr, nullptr);
    }
};

bool says_busy(const char* msg) { return std::strstr(msg, "in use by another thread") != nullptr; }

// Thread a of the tests below: one ingest of b, retried while the main thread's probe holds the session.
void ingest_once(const Batch& b, collapse_session* s, std::atomic<bool>* running) {
    collapse_status st;
    while ((st = b.ingest(s)) == COLLAPSE_ERR_STATE) {}
    EXPECT_EQ(st, COLLAPSE_OK) << collapse_last_error();
    *running = false;
}

TEST(Threads, TwoThreadsHammeringOneSessionAreRefusedNotCorrupted) {
    const Batch batch(1024, 32);
    // Sampled: the reservoirs are rewritten by every batch (a row store that mutates) in bounded memory.
    SessionPtr s(new_session(COLLAPSE_SVD_SAMPLED));
    std::atomic<int> accepted{0}, refused{0}, other{0};
    std::atomic<bool> stop{false};
    std::string other_message;  // written by at most one thread (the first to see an unexpected status)
    auto hammer = [&] {
        while (!stop.load() && accepted.load() < 2000) {
            const collapse_status st = batch.ingest(s.get());
            if (st == COLLAPSE_OK) {
                ++accepted;
            } else if (st == COLLAPSE_ERR_STATE && says_busy(collapse_last_error())) {
                ++refused;
            } else if (other++ == 0) {
                other_message = std::to_string(st) + ": " + collapse_last_error();
            }
        }
    };
    std::thread a(hammer), b(hammer);
    // Until both outcomes have been seen (on 2 cores that takes milliseconds), at most 60 s.
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    while ((refused.load() == 0 || accepted.load() < 4) && std::chrono::steady_clock::now() < deadline)
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
    stop = true;
    a.join();
    b.join();
    EXPECT_EQ(other.load(), 0) << other_message;
    EXPECT_GT(refused.load(), 0) << "no overlapping call was refused";
    ASSERT_GT(accepted.load(), 0);

    // The session is intact: same report as one thread ingesting the batch `accepted` times.
    SessionPtr ref(new_session(COLLAPSE_SVD_SAMPLED));
    for (int i = 0; i < accepted.load(); ++i) ASSERT_EQ(batch.ingest(ref.get()), COLLAPSE_OK) << collapse_last_error();
    const nlohmann::json got = testutil::final_report(s.get()), want = testutil::final_report(ref.get());
    ASSERT_FALSE(got.is_null());
    EXPECT_EQ(got["counts"]["rows_seen"], accepted.load() * batch.n);
    testutil::expect_same_json(got, want, 0.0);
}

// Every session entry point takes the guard: each is refused while another thread's call runs.
TEST(Threads, EverySessionCallIsRefusedWhileAnotherRuns) {
    const Batch big(1 << 16, 64);  // one ingest long enough (milliseconds) to be caught running
    const Batch small(8, 64);
    const std::string ckpt = ::testing::TempDir() + "collapse_threads.ckpt";
    int checked = 0;
    for (int attempt = 0; attempt < 50 && checked == 0; ++attempt) {
        SessionPtr s(new_session());
        std::atomic<bool> running{true};
        std::thread a(ingest_once, std::cref(big), s.get(), &running);
        // Wait until a's call holds the session (sync is refused), then try every other call.
        collapse_status probe = COLLAPSE_OK;
        while (running.load() && (probe = collapse_session_sync(s.get())) != COLLAPSE_ERR_STATE) {}
        if (probe == COLLAPSE_ERR_STATE) {
            int needed = 0;
            collapse_report* r = nullptr;
            collapse_report* snap = nullptr;
            const collapse_buffer w{big.x.data(), COLLAPSE_F32, COLLAPSE_MEMORY_HOST, kV, 64, 0};
            const collapse_buffer ids{small.y.data(), COLLAPSE_I32, COLLAPSE_MEMORY_HOST, 2, 4, 0};
            const collapse_status got[] = {
                small.ingest(s.get()),
                collapse_session_ingest_sequences(s.get(), &w, &ids, nullptr, 2, 4, nullptr),
                collapse_session_set_classifier(s.get(), &w, nullptr),
                collapse_session_needs_second_pass(s.get(), &needed),
                collapse_session_begin_second_pass(s.get()),
                collapse_session_save(s.get(), ckpt.c_str()),
                collapse_session_load(s.get(), ckpt.c_str()),
                collapse_session_merge(s.get(), ckpt.c_str()),
                collapse_session_compute(s.get(), &r),
                collapse_session_snapshot(s.get(), &snap),
            };
            // Counted only if a's call was still running after the last of them.
            if (collapse_session_sync(s.get()) == COLLAPSE_ERR_STATE) {
                for (size_t i = 0; i < sizeof got / sizeof got[0]; ++i) EXPECT_EQ(got[i], COLLAPSE_ERR_STATE) << "call " << i;
                EXPECT_TRUE(says_busy(collapse_last_error())) << collapse_last_error();
                EXPECT_EQ(r, nullptr);
                EXPECT_EQ(snap, nullptr);
                ++checked;
            }
            if (r) collapse_report_destroy(r);
            if (snap) collapse_report_destroy(snap);
        }
        a.join();
        if (checked) {
            // Nothing was changed by the refused calls: only a's rows are in the session.
            const nlohmann::json rep = testutil::final_report(s.get());
            EXPECT_EQ(rep["counts"]["rows_seen"], big.n);
        }
    }
    EXPECT_EQ(checked, 1) << "never caught a call running";
}

// collapse_session_destroy overlapping a call is the caller's error: it frees nothing (so the running
// call does not use freed memory) and says so; a later destroy frees the session (ASan: no leak).
TEST(Threads, DestroyWhileAnotherThreadCallsFreesNothing) {
    const Batch big(1 << 16, 64);
    bool detected = false;
    for (int attempt = 0; attempt < 50 && !detected; ++attempt) {
        collapse_session* s = new_session();
        std::atomic<bool> running{true};
        std::thread a(ingest_once, std::cref(big), s, &running);
        while (running.load() && collapse_session_sync(s) != COLLAPSE_ERR_STATE) {}
        collapse_session_destroy(s);
        detected = std::strstr(collapse_last_error(), "collapse_session_destroy: not destroyed") != nullptr;
        a.join();  // when not detected, a's call had returned before the destroy: s is gone
        if (detected) {
            EXPECT_TRUE(says_busy(collapse_last_error())) << collapse_last_error();
            EXPECT_EQ(testutil::final_report(s)["counts"]["rows_seen"], big.n);  // still whole and usable
            collapse_session_destroy(s);
        }
    }
    EXPECT_TRUE(detected) << "never caught a call running";
}

// A report is read-only: threads reading one report at once (collapse_report_json fills its text
// on first use) all get the same text. A racy fill (two threads assigning the text) only fails
// here when the threads collide, rarely outside ThreadSanitizer: a smoke test, not a proof.
TEST(Threads, ConcurrentReadersOfOneReport) {
    const Batch batch(256, 8);
    for (int round = 0; round < 20; ++round) {
        SessionPtr s(new_session());
        ASSERT_EQ(batch.ingest(s.get()), COLLAPSE_OK) << collapse_last_error();
        collapse_report* raw = nullptr;
        ASSERT_EQ(collapse_session_compute(s.get(), &raw), COLLAPSE_OK) << collapse_last_error();
        testutil::ReportPtr r(raw);
        constexpr int kReaders = 4;
        std::atomic<int> ready{0};
        std::vector<std::string> texts(kReaders);
        std::vector<std::thread> readers;
        for (int t = 0; t < kReaders; ++t)
            readers.emplace_back([&, t] {
                ++ready;
                while (ready.load() < kReaders) {}  // start together
                const char* text = nullptr;
                double gnc2 = 0;
                EXPECT_EQ(collapse_report_json(r.get(), &text), COLLAPSE_OK) << collapse_last_error();
                EXPECT_EQ(collapse_report_get_scalar(r.get(), "overall_gnc2", &gnc2, nullptr), COLLAPSE_OK);
                if (text) texts[(size_t)t] = text;
            });
        for (auto& t : readers) t.join();
        for (int t = 1; t < kReaders; ++t) EXPECT_EQ(texts[(size_t)t], texts[0]);
        EXPECT_FALSE(texts[0].empty());
    }
}

}  // namespace
}  // namespace test_threads
