// Peak resident memory, as the kernel measures it: in this process (VmHWM, reset through
// /proc/self/clear_refs) or of a child process (wait4's ru_maxrss, and the peak of its anonymous
// resident memory polled from /proc/<pid>/status: file pages a child maps do not count there).
#pragma once
#include <fcntl.h>
#include <malloc.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace testutil {

// A field of /proc/<pid>/status in bytes ("VmHWM:", "VmRSS:", "RssAnon:"), or -1.
inline int64_t proc_status_bytes(const char* field, const std::string& pid = "self") {
    std::ifstream f("/proc/" + pid + "/status");
    std::string line;
    while (std::getline(f, line))
        if (line.rfind(field, 0) == 0) {
            std::istringstream is(line.substr(std::string(field).size()));
            int64_t kib = -1;
            is >> kib;
            return kib < 0 ? -1 : kib * 1024;
        }
    return -1;
}

// How far the resident set rose above where it stood at construction. Freed heap is given back
// first (malloc_trim), so that memory freed by earlier tests cannot be reused unseen.
// usable() is false where the kernel refuses to reset the peak (the caller should skip).
class PeakRss {
public:
    PeakRss() {
        ::malloc_trim(0);
        std::ofstream cr("/proc/self/clear_refs");
        if (cr) {
            cr << "5";  // resets VmHWM to the current VmRSS
            cr.flush();
            usable_ = cr.good();
        }
        base_ = proc_status_bytes("VmRSS:");
        usable_ = usable_ && base_ > 0;
    }
    bool usable() const { return usable_; }
    int64_t growth() const { return proc_status_bytes("VmHWM:") - base_; }

private:
    bool usable_ = false;
    int64_t base_ = -1;
};

struct ChildRun {
    int status = -1;        // exit status, -1 when it did not exit normally
    int64_t peak_rss = 0;   // bytes
    int64_t peak_anon = 0;  // bytes: the largest RssAnon seen, polled every millisecond
};

// Runs argv[0] with argv (stdout and stderr to `log`, OpenBLAS on one thread) and returns its exit
// status and peak resident set.
inline ChildRun run_child(const std::vector<std::string>& args, const std::string& log) {
    std::vector<std::string> a = args;
    std::vector<char*> argv;
    for (auto& s : a) argv.push_back(s.data());
    argv.push_back(nullptr);
    const pid_t pid = ::fork();
    if (pid == 0) {
        const int out = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
        ::dup2(out, 1);
        ::dup2(out, 2);
        ::setenv("OPENBLAS_NUM_THREADS", "1", 1);
        ::execv(argv[0], argv.data());
        ::_exit(127);
    }
    ChildRun r;
    if (pid < 0) return r;
    int status = 0;
    struct rusage ru {};
    pid_t done = 0;
    while ((done = ::wait4(pid, &status, WNOHANG, &ru)) == 0) {
        r.peak_anon = std::max(r.peak_anon, proc_status_bytes("RssAnon:", std::to_string(pid)));
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    if (done == pid) {
        r.status = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
        r.peak_rss = (int64_t)ru.ru_maxrss * 1024;
    }
    return r;
}

}  // namespace testutil
