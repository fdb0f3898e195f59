#include "mpi/mpi_state.hpp"

#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <map>
#include <memory>
#include <new>
#include <vector>

#include "base/error.hpp"
#include "core/host_budget.hpp"
#include "io/checkpoint_file.hpp"
#include "io/session_checkpoint.hpp"

namespace collapse::internal::mpi {

namespace {

constexpr int kTagGo = 0x6c01, kTagFrame = 0x6c02, kTagData = 0x6c03;
enum Kind : uint32_t { kSection = 1, kEnd = 2, kError = 3, kEmpty = 4 };

// One frame: a section's header, the end of a state, or a rank's error.
struct Frame {
    uint32_t kind = 0, dtype = 0, ndim = 0;
    int32_t status = 0;
    int64_t shape[4] = {0, 0, 0, 0};
    uint64_t bytes = 0;
    std::string text;  // the section's name, or the error message
};
constexpr size_t kFrameHead = 4 * 4 + 4 * 8 + 8;

std::vector<uint8_t> encode(const Frame& f) {
    std::vector<uint8_t> b(kFrameHead + f.text.size());
    uint8_t* p = b.data();
    auto put = [&](const void* v, size_t n) { std::memcpy(p, v, n), p += n; };
    put(&f.kind, 4), put(&f.dtype, 4), put(&f.ndim, 4), put(&f.status, 4), put(f.shape, 32), put(&f.bytes, 8);
    put(f.text.data(), f.text.size());
    return b;
}

Frame decode(const std::vector<uint8_t>& b) {
    if (b.size() < kFrameHead) fail(COLLAPSE_ERR_INTERNAL, "MPI state transfer: a frame of ", b.size(), " bytes is too short");
    Frame f;
    const uint8_t* p = b.data();
    auto get = [&](void* v, size_t n) { std::memcpy(v, p, n), p += n; };
    get(&f.kind, 4), get(&f.dtype, 4), get(&f.ndim, 4), get(&f.status, 4), get(f.shape, 32), get(&f.bytes, 8);
    f.text.assign(reinterpret_cast<const char*>(p), b.size() - kFrameHead);
    if (f.ndim > 4) fail(COLLAPSE_ERR_INTERNAL, "MPI state transfer: a frame with ", f.ndim, " dimensions");
    return f;
}

}  // namespace

// Packets to one peer (point to point) or from the root to all (broadcast). A point-to-point
// channel with a pump calls it while each send waits (the row exchange receives as it sends).
class Channel {
public:
    static Channel p2p(MPI_Comm c, int peer, std::function<void()> pump = {}) {
        Channel ch(c, peer, false);
        ch.pump_ = std::move(pump);
        return ch;
    }
    static Channel bcast(MPI_Comm c, int root) { return Channel(c, root, true); }

    void send_frame(const Frame& f) {
        const std::vector<uint8_t> b = encode(f);
        send(b.data(), true, b.size());
    }
    void send_data(const void* p, size_t n) { send(p, false, n); }
    // The next packet: a frame (true, in f) or data (false, in data).
    bool recv(Frame& f, std::vector<uint8_t>& data) {
        if (bcast_) {
            uint64_t word = 0;
            MPI_Bcast(&word, 1, MPI_UINT64_T, peer_, comm_);
            const bool frame = word >> 63;
            data.resize((size_t)(word & ~(uint64_t(1) << 63)));
            MPI_Bcast(data.data(), (int)data.size(), MPI_BYTE, peer_, comm_);
            if (frame) f = decode(data);
            return frame;
        }
        MPI_Status st;
        MPI_Probe(peer_, MPI_ANY_TAG, comm_, &st);
        int n = 0;
        MPI_Get_count(&st, MPI_BYTE, &n);
        data.resize((size_t)n);
        MPI_Recv(data.data(), n, MPI_BYTE, peer_, st.MPI_TAG, comm_, MPI_STATUS_IGNORE);
        if (st.MPI_TAG == kTagFrame) f = decode(data);
        return st.MPI_TAG == kTagFrame;
    }

private:
    Channel(MPI_Comm c, int peer, bool bcast) : comm_(c), peer_(peer), bcast_(bcast) {}
    void send(const void* p, bool frame, size_t n) {
        if (bcast_) {
            uint64_t word = (uint64_t)n | (frame ? uint64_t(1) << 63 : 0);
            MPI_Bcast(&word, 1, MPI_UINT64_T, peer_, comm_);
            MPI_Bcast(const_cast<void*>(p), (int)n, MPI_BYTE, peer_, comm_);
        } else if (pump_) {
            MPI_Request rq;
            MPI_Isend(p, (int)n, MPI_BYTE, peer_, frame ? kTagFrame : kTagData, comm_, &rq);
            for (int done = 0;;) {
                MPI_Test(&rq, &done, MPI_STATUS_IGNORE);
                if (done) break;
                pump_();
            }
        } else {
            MPI_Send(p, (int)n, MPI_BYTE, peer_, frame ? kTagFrame : kTagData, comm_);
        }
    }
    MPI_Comm comm_;
    int peer_;
    bool bcast_;
    std::function<void()> pump_;  // never throws
};

namespace {

// A state written into packets: section frames and their bytes in pieces of at most `chunk`.
class PacketWriter final : public StateWriter {
public:
    PacketWriter(Channel& ch, size_t chunk) : ch_(ch), chunk_(chunk) {}
    void add(const std::string& name, uint32_t t, const std::vector<int64_t>& shape, const void* data, size_t bytes) override {
        begin_section(name, t, shape, bytes);
        append(data, bytes);
        end_section();
    }
    void begin_section(const std::string& name, uint32_t t, const std::vector<int64_t>& shape, size_t bytes) override {
        Frame f;
        f.kind = kSection, f.dtype = t, f.ndim = (uint32_t)shape.size(), f.bytes = bytes, f.text = name;
        if (shape.size() > 4) fail(COLLAPSE_ERR_INTERNAL, "section ", name, " has more than 4 dimensions");
        for (size_t i = 0; i < shape.size(); ++i) f.shape[i] = shape[i];
        ch_.send_frame(f);
    }
    void append(const void* data, size_t bytes) override {
        const uint8_t* p = static_cast<const uint8_t*>(data);
        while (bytes > 0) {
            const size_t n = std::min(bytes, chunk_);
            ch_.send_data(p, n);
            p += n, bytes -= n;
        }
    }
    void end_section() override {}

private:
    Channel& ch_;
    size_t chunk_;
};

// Small states (class sums, second-pass partial results) held in memory, counted in the session's
// host_memory_limit account.
class MemoryState final : public StateWriter, public StateReader {
public:
    MemoryState(std::string what, std::shared_ptr<HostBudget> budget) : what_(std::move(what)), budget_(std::move(budget)) {}
    void add(const std::string& name, uint32_t t, const std::vector<int64_t>& shape, const void* data, size_t bytes) override {
        begin_section(name, t, shape, bytes);
        append(data, bytes);
        end_section();
    }
    void begin_section(const std::string& name, uint32_t t, const std::vector<int64_t>& shape, size_t bytes) override {
        leases_.push_back(budget_->reserve((int64_t)bytes, "section " + name + " of " + what_));
        Sec& s = secs_[name];
        s.dtype = t, s.shape = shape, s.want = bytes;
        s.bytes.clear();
        s.bytes.reserve(bytes);
        cur_ = &s;
        cur_name_ = name;
    }
    void append(const void* data, size_t bytes) override {
        if (!cur_ || cur_->bytes.size() + bytes > cur_->want) fail(COLLAPSE_ERR_INTERNAL, what_, ": more bytes than declared");
        const uint8_t* p = static_cast<const uint8_t*>(data);
        cur_->bytes.insert(cur_->bytes.end(), p, p + bytes);
    }
    void end_section() override {
        if (cur_ && cur_->bytes.size() != cur_->want) fail(COLLAPSE_ERR_INTERNAL, what_, ": section ", cur_name_, " is short");
        cur_ = nullptr;
    }
    std::string description() const override { return what_; }
    // Every section, to another writer (a part computed ahead of the root's asking).
    void write_to(StateWriter& w) const {
        for (const auto& [name, sec] : secs_) w.add(name, sec.dtype, sec.shape, sec.bytes.data(), sec.bytes.size());
    }
    bool has(const std::string& name) const override { return secs_.count(name) > 0; }
    StateSection section(const std::string& name) const override {
        const auto it = secs_.find(name);
        if (it == secs_.end()) fail(COLLAPSE_ERR_IO, what_, ": missing section ", name);
        StateSection s;
        s.name = name, s.dtype_code = it->second.dtype, s.shape = it->second.shape, s.bytes = it->second.bytes.size();
        s.data = s.bytes ? it->second.bytes.data() : nullptr;
        return s;
    }

private:
    struct Sec {
        uint32_t dtype = 0;
        std::vector<int64_t> shape;
        size_t want = 0;
        std::vector<uint8_t> bytes;
    };
    std::string what_;
    std::shared_ptr<HostBudget> budget_;
    std::vector<HostBudget::Lease> leases_;
    std::map<std::string, Sec> secs_;
    Sec* cur_ = nullptr;
    std::string cur_name_;
};

struct Outcome {
    bool empty = false;
    collapse_status status = COLLAPSE_OK;
    std::string error;
};

// Everything one state sends, into `into` (nullptr: drained and dropped). A sender's error frame
// ends it with that error; an error of `into` (a full disk) is kept and the rest is drained, so
// that the sender never waits on a receiver that has given up.
int64_t g_received = 0;  // bytes this process took in (received_bytes)

Outcome receive_state(Channel& ch, StateWriter* into) {
    Outcome out;
    Frame f;
    std::vector<uint8_t> data;
    auto writer_failed = [&](const Error& e) {
        if (out.status == COLLAPSE_OK) out.status = e.status(), out.error = e.what();
        into = nullptr;
    };
    for (;;) {
        if (!ch.recv(f, data)) fail(COLLAPSE_ERR_INTERNAL, "MPI state transfer: data where a frame was expected");
        if (f.kind == kEnd) return out;
        if (f.kind == kEmpty) {
            out.empty = true;
            return out;
        }
        if (f.kind == kError) {
            out.status = (collapse_status)f.status, out.error = f.text;
            return out;
        }
        if (f.kind != kSection) fail(COLLAPSE_ERR_INTERNAL, "MPI state transfer: frame of unknown kind ", f.kind);
        const std::vector<int64_t> shape(f.shape, f.shape + f.ndim);
        try {
            if (into) into->begin_section(f.text, f.dtype, shape, (size_t)f.bytes);
        } catch (const Error& e) {
            writer_failed(e);
        }
        for (uint64_t left = f.bytes; left > 0;) {
            Frame g;
            if (ch.recv(g, data)) {  // the sender failed inside the section
                if (g.kind != kError) fail(COLLAPSE_ERR_INTERNAL, "MPI state transfer: a frame inside section ", f.text);
                out.status = (collapse_status)g.status, out.error = g.text;
                return out;
            }
            if (data.size() > left) fail(COLLAPSE_ERR_INTERNAL, "MPI state transfer: section ", f.text, " longer than declared");
            left -= data.size();
            g_received += (int64_t)data.size();
            try {
                if (into) into->append(data.data(), data.size());
            } catch (const Error& e) {
                writer_failed(e);
            }
        }
        try {
            if (into) into->end_section();
        } catch (const Error& e) {
            writer_failed(e);
        }
    }
}

// What a rank sends: its sections then the end, or (nothing written) kEmpty, or its error (which
// is also returned).
Outcome send_state(Channel& ch, size_t chunk, int rank, const std::function<bool(StateWriter&)>& body) {
    PacketWriter w(ch, chunk);
    Frame end;
    try {
        end.kind = body(w) ? kEnd : kEmpty;
    } catch (const Error& e) {
        end.kind = kError, end.status = e.status(), end.text = "rank " + std::to_string(rank) + ": " + e.what();
    } catch (const std::bad_alloc&) {
        end.kind = kError, end.status = COLLAPSE_ERR_OUT_OF_MEMORY, end.text = "rank " + std::to_string(rank) + ": out of memory";
    } catch (const std::exception& e) {
        end.kind = kError, end.status = COLLAPSE_ERR_INTERNAL, end.text = "rank " + std::to_string(rank) + ": internal error: " + e.what();
    }
    ch.send_frame(end);
    Outcome o;
    if (end.kind == kError) o.status = (collapse_status)end.status, o.error = end.text;
    return o;
}

// The root's verdict to every rank; thrown everywhere when it is an error.
void share_outcome(MPI_Comm comm, int root, collapse_status status, const std::string& msg) {
    int code = (int)status;
    MPI_Bcast(&code, 1, MPI_INT, root, comm);
    uint64_t n = msg.size();
    MPI_Bcast(&n, 1, MPI_UINT64_T, root, comm);
    std::string text = msg;
    text.resize((size_t)n);
    MPI_Bcast(text.data(), (int)n, MPI_BYTE, root, comm);
    if (code != 0) throw CollectiveError((collapse_status)code, text);
}

// The root takes every other rank's state in rank order, asking each in turn ("go"), so that it
// holds at most one incoming state; after an error it asks no further rank (they send nothing).
void gather(MPI_Comm comm, int root, size_t chunk, const std::function<bool(StateWriter&)>& send,
            const std::function<void(int, Channel&)>& take) {
    int rank = 0, P = 1;
    MPI_Comm_rank(comm, &rank);
    MPI_Comm_size(comm, &P);
    collapse_status status = COLLAPSE_OK;
    std::string msg;
    if (rank == root) {
        for (int r = 0; r < P; ++r) {
            if (r == root) continue;
            int go = status == COLLAPSE_OK ? 1 : 0;
            MPI_Send(&go, 1, MPI_INT, r, kTagGo, comm);
            if (!go) continue;
            Channel ch = Channel::p2p(comm, r);
            try {
                take(r, ch);
            } catch (const Error& e) {
                status = e.status(), msg = e.what();
            } catch (const std::bad_alloc&) {
                status = COLLAPSE_ERR_OUT_OF_MEMORY, msg = "rank " + std::to_string(root) + " (root): out of memory";
            }
        }
    } else {
        int go = 0;
        MPI_Recv(&go, 1, MPI_INT, root, kTagGo, comm, MPI_STATUS_IGNORE);
        if (go) {
            Channel ch = Channel::p2p(comm, root);
            send_state(ch, chunk, rank, send);
        }
    }
    share_outcome(comm, root, status, msg);
}

// A private spool file in intermediate_save_dir for rank r's incoming state, removed on scope exit.
struct Spool {
    std::string path;
    explicit Spool(const Config& cfg, int r) {
        std::filesystem::path dir = cfg.intermediate_save_dir.empty() ? std::filesystem::path(".") : std::filesystem::path(cfg.intermediate_save_dir);
        std::error_code ec;
        std::filesystem::create_directories(dir, ec);
        if (ec) fail(COLLAPSE_ERR_IO, "cannot create intermediate_save_dir ", dir.string(), " for the ranks' states: ", ec.message());
        path = (dir / ("mpi_state_rank" + std::to_string(r) + "_pid" + std::to_string(::getpid()) + ".ckpt")).string();
    }
    ~Spool() {
        std::error_code ec;
        std::filesystem::remove(path, ec);
    }
};

}  // namespace

int64_t received_bytes() { return g_received; }

size_t chunk_bytes() {
    if (const char* e = std::getenv("COLLAPSE_MPI_CHUNK_BYTES")) {
        char* end = nullptr;
        const long long v = std::strtoll(e, &end, 10);
        if (end && *end == 0 && v >= 64 && v <= (1ll << 30)) return (size_t)v;
        fail(COLLAPSE_ERR_INVALID_ARGUMENT, "COLLAPSE_MPI_CHUNK_BYTES=", e, " is not a byte count in [64, 2^30]");
    }
    return kDefaultChunk;
}

void agree(MPI_Comm comm, const std::function<void()>& body) {
    int rank = 0;
    MPI_Comm_rank(comm, &rank);
    int code = 0;
    std::string msg;
    try {
        body();
    } catch (const Error& e) {
        code = e.status(), msg = e.what();
    } catch (const std::bad_alloc&) {
        code = COLLAPSE_ERR_OUT_OF_MEMORY, msg = "out of memory";
    } catch (const std::exception& e) {
        code = COLLAPSE_ERR_INTERNAL, msg = std::string("internal error: ") + e.what();
    }
    int mine = code ? rank : INT_MAX, first = INT_MAX;
    MPI_Allreduce(&mine, &first, 1, MPI_INT, MPI_MIN, comm);
    if (first == INT_MAX) return;
    MPI_Bcast(&code, 1, MPI_INT, first, comm);
    uint64_t n = msg.size();
    MPI_Bcast(&n, 1, MPI_UINT64_T, first, comm);
    msg.resize((size_t)n);
    MPI_Bcast(msg.data(), (int)n, MPI_BYTE, first, comm);
    // A message that already names its rank (a forwarded one) keeps its own prefix.
    throw CollectiveError((collapse_status)code, msg.rfind("rank ", 0) == 0 ? msg : "rank " + std::to_string(first) + ": " + msg);
}

// Every rank's part (mine) to the root, which merges them in rank order: its own first
// (own_first), or in its rank's place. `what` names a part ("rank r's <what>"), `short_name` a
// refused one ("rank r's <short_name> was refused by the root: ...").
void gather_parts(Session& s, MPI_Comm comm, int root, size_t chunk, const MemoryState& mine, bool own_first, const std::string& what,
                  const std::string& short_name, const std::function<void(const MemoryState&)>& merge) {
    int rank = 0;
    MPI_Comm_rank(comm, &rank);
    bool own_added = false;
    auto add_own = [&] {
        if (own_added) return;
        own_added = true;
        merge(mine);
    };
    auto send = [&](StateWriter& w) {
        mine.write_to(w);
        return true;
    };
    auto take = [&](int r, Channel& ch) {
        MemoryState part("rank " + std::to_string(r) + "'s " + what, s.budget_account());
        const Outcome got = receive_state(ch, &part);
        if (got.status != COLLAPSE_OK) throw Error(got.status, got.error);
        try {
            if (own_first || r > root) add_own();
            merge(part);
        } catch (const Error& e) {
            throw Error(e.status(), "rank " + std::to_string(r) + "'s " + short_name + " was refused by the root: " + e.what());
        }
    };
    gather(comm, root, chunk, send, take);
    agree(comm, [&] {
        if (rank == root) add_own();
    });
}

namespace {

// The root's combined class counts and sums to every rank, which adopts them (its kept set and
// means become the root's).
void share_class_sums(Session& s, MPI_Comm comm, int root, size_t chunk) {
    int rank = 0;
    MPI_Comm_rank(comm, &rank);
    Channel ch = Channel::bcast(comm, root);
    Outcome o;
    MemoryState sums("the root's combined class sums", s.budget_account());
    if (rank == root) {
        o = send_state(ch, chunk, rank, [&](StateWriter& w) {
            s.write_class_sums(w);
            return true;
        });
    } else {
        o = receive_state(ch, &sums);
    }
    agree(comm, [&] {
        if (o.status != COLLAPSE_OK) throw Error(o.status, o.error);
        if (rank != root) s.adopt_class_sums(sums);
    });
}

// Rows arriving at the rank that owns their class: sections "rows" of shape [c, n, d] (n whole
// rows of class c, at most a piece), each appended to the session's new store when complete;
// reservoir rows come after a section "rows_slots" int64 [n], their slots in the class's sample.
class RowsIn final : public StateWriter {
public:
    RowsIn(Session& s) : s_(s), lease_(s.budget_account()->lease()) {}
    void add(const std::string& name, uint32_t t, const std::vector<int64_t>& shape, const void* data, size_t bytes) override {
        begin_section(name, t, shape, bytes);
        append(data, bytes);
        end_section();
    }
    void begin_section(const std::string& name, uint32_t t, const std::vector<int64_t>& shape, size_t bytes) override {
        if (name == "rows_slots" && t == (uint32_t)COLLAPSE_I64 && shape.size() == 1 && shape[0] >= 0 && bytes == (size_t)shape[0] * 8) {
            slots_on_ = true, want_ = bytes;
            slots_.clear();
            slots_.reserve((size_t)shape[0]);
            return;
        }
        if (name != "rows" || t != (uint32_t)COLLAPSE_F64 || shape.size() != 3 || shape[1] < 0 || shape[2] != s_.dim() ||
            bytes != (size_t)(shape[1] * shape[2]) * 8)
            fail(COLLAPSE_ERR_INTERNAL, "MPI row exchange: section ", name, " is not float64 [class, rows, d = ", s_.dim(), "]");
        c_ = (int32_t)shape[0], n_ = shape[1], want_ = bytes;
        lease_.resize((int64_t)(bytes + slots_.capacity()), "a piece of " + std::to_string(n_) + " rows of class " + std::to_string(c_) + " moving to the rank that owns it");
        buf_.clear();
        buf_.reserve(bytes);
    }
    void append(const void* data, size_t bytes) override {
        std::vector<uint8_t>& to = slots_on_ ? slots_ : buf_;
        if (to.size() + bytes > want_) fail(COLLAPSE_ERR_INTERNAL, "MPI row exchange: more bytes than declared");
        const uint8_t* p = static_cast<const uint8_t*>(data);
        to.insert(to.end(), p, p + bytes);
    }
    void end_section() override {
        if ((slots_on_ ? slots_ : buf_).size() != want_) fail(COLLAPSE_ERR_INTERNAL, "MPI row exchange: a piece is short");
        if (slots_on_) {
            slots_on_ = false, have_slots_ = true;
            return;
        }
        if (have_slots_ && slots_.size() != (size_t)n_ * 8) fail(COLLAPSE_ERR_INTERNAL, "MPI row exchange: slots for another number of rows");
        if (refuse_) fail(COLLAPSE_ERR_IO, "a piece of class ", c_, " refused (COLLAPSE_TEST_MPI_EXCHANGE_FAIL)");
        s_.spread_append(c_, reinterpret_cast<const double*>(buf_.data()), n_, have_slots_ ? reinterpret_cast<const int64_t*>(slots_.data()) : nullptr);
        have_slots_ = false;
    }

private:
    Session& s_;
    HostBudget::Lease lease_;
    std::vector<uint8_t> buf_, slots_;
    bool slots_on_ = false, have_slots_ = false;

public:
    bool refuse_ = false;  // tests: every piece refused, as by a full disk

private:
    int32_t c_ = 0;
    int64_t n_ = 0;
    size_t want_ = 0;
};

// The receiving half of the row exchange: every other rank's state of rows (sections, then the
// end or its error), source after source in rank order, a packet at a time and never blocking,
// so that a rank takes rows in while it sends its own. At its own rank the stream waits until
// own_done(): the rank's own rows go in there, after the lower ranks' rows of its classes. After
// an error (its own writer's, or a sender's frame) the rest is drained and dropped.
class RowStream {
public:
    RowStream(MPI_Comm comm, int rank, int P, StateWriter& into) : comm_(comm), rank_(rank), P_(P), into_(&into) {}
    int source() const { return src_; }  // the rank being received from; P when done
    void own_done() {
        if (src_ == rank_) ++src_;
    }
    // Takes the current source's next packet if one has come; false when none has (or the
    // stream waits for own_done, or is done).
    bool step() {
        if (src_ >= P_ || src_ == rank_) return false;
        int flag = 0;
        MPI_Status st;
        MPI_Iprobe(src_, MPI_ANY_TAG, comm_, &flag, &st);
        if (!flag) return false;
        int n = 0;
        MPI_Get_count(&st, MPI_BYTE, &n);
        data_.resize((size_t)n);
        MPI_Recv(data_.data(), n, MPI_BYTE, src_, st.MPI_TAG, comm_, MPI_STATUS_IGNORE);
        try {
            take(st.MPI_TAG == kTagFrame);
        } catch (const Error& e) {
            keep((collapse_status)e.status(), e.what());
        } catch (const std::bad_alloc&) {
            keep(COLLAPSE_ERR_OUT_OF_MEMORY, "out of memory");
        } catch (const std::exception& e) {
            keep(COLLAPSE_ERR_INTERNAL, std::string("internal error: ") + e.what());
        }
        return true;
    }
    collapse_status status = COLLAPSE_OK;
    std::string error;

private:
    void keep(collapse_status st, const std::string& m) {
        if (status == COLLAPSE_OK) status = st, error = m;
        into_ = nullptr;
    }
    void next() { ++src_, in_section_ = false; }
    void take(bool frame) {
        if (!frame) {
            if (!in_section_ || data_.size() > left_) fail(COLLAPSE_ERR_INTERNAL, "MPI row exchange: data outside a section from rank ", src_);
            left_ -= data_.size();
            g_received += (int64_t)data_.size();
            // The stream's own state first: a writer that throws must not leave it inside the section.
            const bool last = left_ == 0;
            if (last) in_section_ = false;
            if (into_) into_->append(data_.data(), data_.size());
            if (last && into_) into_->end_section();
            return;
        }
        const Frame f = decode(data_);
        if (f.kind == kError) {  // the sender failed (inside a section or between)
            keep((collapse_status)f.status, f.text);
            return next();
        }
        if (in_section_) fail(COLLAPSE_ERR_INTERNAL, "MPI row exchange: a frame inside a section from rank ", src_);
        if (f.kind == kEnd) return next();
        if (f.kind != kSection) fail(COLLAPSE_ERR_INTERNAL, "MPI row exchange: frame of kind ", f.kind, " from rank ", src_);
        in_section_ = true, left_ = f.bytes;
        if (into_) into_->begin_section(f.text, f.dtype, std::vector<int64_t>(f.shape, f.shape + f.ndim), (size_t)f.bytes);
        if (left_ == 0) {
            in_section_ = false;
            if (into_) into_->end_section();
        }
    }
    MPI_Comm comm_;
    int rank_, P_, src_ = 0;
    StateWriter* into_;
    bool in_section_ = false;
    uint64_t left_ = 0;
    std::vector<uint8_t> data_;
};

// Reservoirs: the root's merged samples (decided as it merged the states, in rank order) say which
// reservoir rows each rank sends, and to which slot; sources[i] is the rank of merge source i.
void scatter_picks(Session& s, MPI_Comm comm, int root, size_t chunk, const std::vector<int32_t>& ids, const std::vector<int>& sources) {
    int rank = 0, P = 1;
    MPI_Comm_rank(comm, &rank);
    MPI_Comm_size(comm, &P);
    MemoryState mine("rank " + std::to_string(rank) + "'s picks of its reservoir rows", s.budget_account());
    Outcome o;
    if (rank == root) {
        std::vector<int> source_of((size_t)P, -1);
        for (size_t i = 0; i < sources.size(); ++i) source_of[(size_t)sources[i]] = (int)i;
        try {
            s.spread_write_picks(0, ids, mine);
        } catch (const Error& e) {
            o.status = e.status(), o.error = e.what();
        } catch (const std::bad_alloc&) {
            o.status = COLLAPSE_ERR_OUT_OF_MEMORY, o.error = "out of memory";
        }
        for (int r = 0; r < P; ++r) {
            if (r == root) continue;
            Channel ch = Channel::p2p(comm, r);
            const Outcome sent = send_state(ch, chunk, rank, [&](StateWriter& w) {
                if (o.status != COLLAPSE_OK) throw Error(o.status, o.error);
                if (source_of[(size_t)r] < 0) fail(COLLAPSE_ERR_INTERNAL, "rank ", r, "'s state was not merged on the root");
                s.spread_write_picks(source_of[(size_t)r], ids, w);
                return true;
            });
            if (o.status == COLLAPSE_OK) o = sent;
        }
    } else {
        Channel ch = Channel::p2p(comm, root);
        o = receive_state(ch, &mine);
    }
    agree(comm, [&] {
        if (o.status != COLLAPSE_OK) throw Error(o.status, o.error);
        s.spread_take_picks(mine);  // the root's last: its sample was needed until every rank had its picks
    });
}

// The exact row store (or the sampled reservoirs) spread over the ranks by class (core/backend.hpp,
// "spread"), after the first-pass states without their rows were combined on the root: every kept
// class's rows (reservoirs: its merged sample's) go to its owner rank, every rank sending and
// receiving at once, an owner taking the sources in rank order (so it appends them in the order
// one process would have seen them); every rank computes its part of the metrics that need the
// rows at the same time; the root adds the parts in rank order.
void spread_rows(Session& s, MPI_Comm comm, int root, size_t chunk, double t0, int64_t b0, const std::vector<int>& sources) {
    int rank = 0, P = 1;
    MPI_Comm_rank(comm, &rank);
    MPI_Comm_size(comm, &P);
    // COLLAPSE_MPI_STATS: the root says what each step took (bench/mpi_scale.sh).
    const bool stats = rank == root && std::getenv("COLLAPSE_MPI_STATS");
    double t = t0;
    int64_t b = b0;
    auto step = [&](const char* what) {
        if (stats)
            std::fprintf(stderr, "collapse: mpi combine, %s: %.4f s, %lld bytes received by rank %d\n", what, MPI_Wtime() - t,
                         (long long)(g_received - b), rank);
        t = MPI_Wtime(), b = g_received;
    };
    step("the states without their rows to the root");
    share_class_sums(s, comm, root, chunk);
    // The root's assignment (every rank could make it, but one made once cannot differ).
    std::vector<int32_t> ids, owner;
    agree(comm, [&] {
        if (rank == root) owner = s.spread_owners(P, ids);
    });
    uint64_t K = ids.size();
    MPI_Bcast(&K, 1, MPI_UINT64_T, root, comm);
    HostBudget::Lease owners_lease;
    agree(comm, [&] {
        // ids, owners and the lists by owner, 4 bytes each per class (the root's are counted late).
        owners_lease = s.budget_account()->reserve(mul_bytes((int64_t)K, 12), "the owner ranks of " + std::to_string(K) + " kept classes");
        ids.resize((size_t)K), owner.resize((size_t)K);
    });
    MPI_Bcast(ids.data(), (int)K, MPI_INT32_T, root, comm);
    MPI_Bcast(owner.data(), (int)K, MPI_INT32_T, root, comm);
    std::vector<std::vector<int32_t>> owned((size_t)P);
    for (size_t i = 0; i < ids.size(); ++i) owned[(size_t)owner[i]].push_back(ids[i]);
    // Reservoirs: every rank learns which of its rows are in the merged samples (the root's).
    int samples = 0;
    agree(comm, [&] { samples = rank == root && s.spread_samples() ? 1 : 0; });
    MPI_Bcast(&samples, 1, MPI_INT, root, comm);
    if (samples) scatter_picks(s, comm, root, chunk, ids, sources);
    agree(comm, [&] { s.spread_open(owned[(size_t)rank]); });

    const int64_t d = s.dim();
    const int64_t piece = std::max<int64_t>(1, (int64_t)chunk / (d * 8));  // whole rows, at most a chunk when a row fits in one
    RowsIn in(s);
    // Tests: COLLAPSE_TEST_MPI_EXCHANGE_FAIL=r makes rank r refuse the rows that come to it.
    if (const char* f = std::getenv("COLLAPSE_TEST_MPI_EXCHANGE_FAIL"); f && std::atoi(f) == rank) in.refuse_ = true;
    collapse_status status = COLLAPSE_OK;
    std::string msg;
    auto keep = [&](collapse_status st, const std::string& m) {
        if (status == COLLAPSE_OK && st != COLLAPSE_OK) status = st, msg = m;
    };
    // Every rank sends and receives at once: rank r sends to the owners in rank order (its own
    // classes' rows go in at its own place) while it takes in, source after source in rank order,
    // the rows of the classes it owns, so that an owner appends a class's rows in the order one
    // process saw them. Pair (source s, owner o) waits only for pairs (s, o' < o) and (s' < s, o):
    // no cycle, and all pairs on one anti-diagonal s + o move at the same time. Each rank holds
    // one piece in flight each way.
    RowStream rx(comm, rank, P, in);
    // Nothing came: let the other ranks of an oversubscribed node run.
    auto pump = [&] {
        if (!rx.step()) sched_yield();
    };
    for (int dst = 0; dst < P; ++dst) {
        if (dst == rank) {
            while (rx.source() < rank) pump();
            keep(rx.status, rx.error);
            try {
                if (status == COLLAPSE_OK)
                    s.spread_read(owned[(size_t)rank], piece, [&](int32_t c, const double* x, int64_t n, const int64_t* slots) { s.spread_append(c, x, n, slots); });
            } catch (const Error& e) {
                keep(e.status(), e.what());
            } catch (const std::bad_alloc&) {
                keep(COLLAPSE_ERR_OUT_OF_MEMORY, "out of memory");
            }
            rx.own_done();
            continue;
        }
        keep(rx.status, rx.error);
        Channel ch = Channel::p2p(comm, dst, pump);
        // After an error of this rank the others get its error frame (they never wait on it).
        const Outcome o = send_state(ch, chunk, rank, [&](StateWriter& w) {
            if (status != COLLAPSE_OK) throw Error(status, msg);
            s.spread_read(owned[(size_t)dst], piece, [&](int32_t c, const double* x, int64_t n, const int64_t* slots) {
                if (slots) w.add("rows_slots", COLLAPSE_I64, {n}, slots, (size_t)n * 8);
                w.add("rows", COLLAPSE_F64, {c, n, d}, x, (size_t)(n * d) * 8);
            });
            return true;
        });
        keep(o.status, o.error);
    }
    while (rx.source() < P) pump();
    keep(rx.status, rx.error);
    agree(comm, [&] {
        if (status != COLLAPSE_OK) throw Error(status, msg);
        s.spread_close();
    });
    step("class sums to every rank, rows to their owners");

    // Every rank's part at once, then to the root, which adds them in rank order (its own first).
    MemoryState mine("rank " + std::to_string(rank) + "'s part of the row-store metrics", s.budget_account());
    const std::clock_t cpu0 = std::clock();
    agree(comm, [&] { s.save_spread_part(mine); });
    // The parts' processor seconds, slowest rank and all ranks (the work the owners split; wall
    // time on a shared machine says less).
    const double cpu = (double)(std::clock() - cpu0) / CLOCKS_PER_SEC;
    double cpu_max = 0, cpu_sum = 0;
    MPI_Reduce(&cpu, &cpu_max, 1, MPI_DOUBLE, MPI_MAX, root, comm);
    MPI_Reduce(&cpu, &cpu_sum, 1, MPI_DOUBLE, MPI_SUM, root, comm);
    if (stats) std::fprintf(stderr, "collapse: mpi combine, the parts' processor time: %.4f s on the busiest rank, %.4f s on all\n", cpu_max, cpu_sum);
    step("every rank's part (the slowest rank's time)");
    gather_parts(s, comm, root, chunk, mine, /*own_first=*/true, "part of the row-store metrics", "part",
                 [&](const MemoryState& part) { s.merge_spread_part(part); });
    step("the parts added on the root");
}

// The pair-metric tiles spread over the ranks (core/backend.hpp, "pairs"), after the combine (the
// root's kept means and variances are final): the root's centred means, variances and tile edge
// to every rank, every rank's contiguous share of the tiles at once, the shares merged on the root
// in rank order; compute() on the root takes them. Skipped when a rank cannot (no rows, or a
// backend without it): the root then reduces every tile itself.
void spread_pairs(Session& s, MPI_Comm comm, int root, size_t chunk) {
    int rank = 0, P = 1;
    MPI_Comm_rank(comm, &rank);
    MPI_Comm_size(comm, &P);
    int can = 0;
    agree(comm, [&] { can = P > 1 && s.can_spread_pairs() ? 1 : 0; });
    MPI_Allreduce(MPI_IN_PLACE, &can, 1, MPI_INT, MPI_MIN, comm);
    if (!can) return;
    const bool stats = rank == root && std::getenv("COLLAPSE_MPI_STATS");
    const double t0 = MPI_Wtime();
    const int64_t b0 = g_received;
    auto in = std::make_unique<MemoryState>("the root's pair-metric inputs", s.budget_account());
    Outcome o;
    bool needed = false;
    if (rank == root) {
        collapse_status st = COLLAPSE_OK;
        std::string msg;
        try {
            needed = s.save_pair_inputs(*in);
        } catch (const Error& e) {
            st = e.status(), msg = e.what();
        } catch (const std::bad_alloc&) {
            st = COLLAPSE_ERR_OUT_OF_MEMORY, msg = "out of memory";
        }
        Channel ch = Channel::bcast(comm, root);
        o = send_state(ch, chunk, rank, [&](StateWriter& w) {
            if (st != COLLAPSE_OK) throw Error(st, msg);
            if (!needed) return false;
            in->write_to(w);
            return true;
        });
    } else {
        Channel ch = Channel::bcast(comm, root);
        o = receive_state(ch, in.get());
        needed = !o.empty;
    }
    agree(comm, [&] {
        if (o.status != COLLAPSE_OK) throw Error(o.status, o.error);
    });
    if (!needed) return;
    MemoryState mine("rank " + std::to_string(rank) + "'s share of the pair-metric tiles", s.budget_account());
    agree(comm, [&] { s.save_pair_part(*in, rank, P, mine); });
    in.reset();
    if (stats) {
        const int64_t* r = static_cast<const int64_t*>(mine.section("pair_tiles").data);
        std::fprintf(stderr, "collapse: mpi combine, pair tiles %lld..%lld of %lld on rank %d: %.4f s, %lld bytes received by rank %d\n",
                     (long long)r[0], (long long)r[1], (long long)r[2], rank, MPI_Wtime() - t0, (long long)(g_received - b0), rank);
    }
    // The root's own share in its rank's place.
    gather_parts(s, comm, root, chunk, mine, /*own_first=*/false, "share of the pair-metric tiles", "pair-metric share",
                 [&](const MemoryState& part) { s.merge_pair_part(part); });
}

void combine_body(Session& s, MPI_Comm comm, int root, size_t chunk) {
    int P = 1;
    MPI_Comm_size(comm, &P);
    // An exact row store on every rank is spread over the ranks by class (spread_rows); otherwise
    // the root takes every rank's whole state.
    const double t0 = MPI_Wtime();
    const int64_t b0 = g_received;
    int spread = 0;
    agree(comm, [&] { spread = P > 1 && s.can_spread_rows() ? 1 : 0; });
    MPI_Allreduce(MPI_IN_PLACE, &spread, 1, MPI_INT, MPI_MIN, comm);
    if (spread) agree(comm, [&] { s.begin_rows_spread(); });
    auto send = [&](StateWriter& w) {
        if (!s.has_backend()) return false;  // no rows yet: nothing to add
        io::write_session_state(s, w);
        return true;
    };
    std::vector<int> sources{root};  // the ranks whose states the root merged, in merge order
    auto take = [&](int r, Channel& ch) {
        Outcome o;
        std::unique_ptr<Spool> spool;
        std::unique_ptr<io::CheckpointWriter> w;
        try {
            spool = std::make_unique<Spool>(s.config(), r);
            w = std::make_unique<io::CheckpointWriter>(spool->path);
        } catch (const Error& e) {
            o.status = e.status(), o.error = e.what();
        }
        const Outcome got = receive_state(ch, w.get());
        if (o.status == COLLAPSE_OK) o = got;
        if (o.status != COLLAPSE_OK) throw Error(o.status, o.error.rfind("rank ", 0) == 0 ? o.error : "rank " + std::to_string(r) + "'s state could not be spooled on the root: " + o.error);
        if (o.empty) return;
        try {
            w->commit();
            const io::CheckpointReader reader(spool->path);
            io::merge_session_state(s, reader);
            sources.push_back(r);
        } catch (const Error& e) {
            throw Error(e.status(), "rank " + std::to_string(r) + "'s state was refused by the root: " + e.what());
        }
    };
    gather(comm, root, chunk, send, take);
    if (spread) spread_rows(s, comm, root, chunk, t0, b0, sources);
    spread_pairs(s, comm, root, chunk);
}

bool begin_second_pass_body(Session& s, MPI_Comm comm, int root, size_t chunk) {
    int rank = 0;
    MPI_Comm_rank(comm, &rank);
    int needed = 0;
    agree(comm, [&] { needed = rank == root && s.needs_second_pass() ? 1 : 0; });
    MPI_Bcast(&needed, 1, MPI_INT, root, comm);
    if (!needed) return false;
    share_class_sums(s, comm, root, chunk);
    agree(comm, [&] { s.begin_second_pass(); });
    return true;
}

void end_second_pass_body(Session& s, MPI_Comm comm, int root, size_t chunk) {
    auto send = [&](StateWriter& w) {
        s.save_second_pass(w);
        return true;
    };
    auto take = [&](int r, Channel& ch) {
        MemoryState part("rank " + std::to_string(r) + "'s second pass", s.budget_account());
        const Outcome o = receive_state(ch, &part);
        if (o.status != COLLAPSE_OK) throw Error(o.status, o.error);
        try {
            s.merge_second_pass(part);
        } catch (const Error& e) {
            throw Error(e.status(), "rank " + std::to_string(r) + "'s second pass was refused by the root: " + e.what());
        }
    };
    gather(comm, root, chunk, send, take);
}

// A failure partway leaves each session with part of another's state: none may go on.
template <class F>
auto unusable_on_error(Session& s, const char* call, F&& body) {
    try {
        return body();
    } catch (...) {
        s.set_unusable(call);
        throw;
    }
}

}  // namespace

void combine(Session& s, MPI_Comm comm, int root, size_t chunk) {
    unusable_on_error(s, "collapse_session_mpi_combine", [&] { combine_body(s, comm, root, chunk); });
}

bool begin_second_pass(Session& s, MPI_Comm comm, int root, size_t chunk) {
    return unusable_on_error(s, "collapse_session_mpi_begin_second_pass", [&] { return begin_second_pass_body(s, comm, root, chunk); });
}

void end_second_pass(Session& s, MPI_Comm comm, int root, size_t chunk) {
    unusable_on_error(s, "collapse_session_mpi_end_second_pass", [&] { end_second_pass_body(s, comm, root, chunk); });
}

}  // namespace collapse::internal::mpi
