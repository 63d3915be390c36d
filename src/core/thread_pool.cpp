#include "core/thread_pool.h"

#include <algorithm>
#include <chrono>
#include <memory>

#include "core/error.h"

namespace qf {

namespace {
inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}
constexpr auto kSpin = std::chrono::microseconds(200);

std::function<void(int)>& spawn_hook() {
  static std::function<void(int)> hook;
  return hook;
}
}  // namespace

void ThreadPool::set_spawn_hook_for_testing(std::function<void(int)> hook) { spawn_hook() = std::move(hook); }

ThreadPool::ThreadPool(int n_threads) {
  if (n_threads <= 0) n_threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  // All workers or none: a worker that cannot be created (a process or address-space limit) must
  // not leave the ones already started waiting on a condition variable that unwinding destroys.
  try {
    workers_.reserve(static_cast<size_t>(n_threads - 1));
    for (int i = 1; i < n_threads; ++i) {
      if (spawn_hook()) spawn_hook()(i);
      workers_.emplace_back([this] { worker_loop(); });
    }
  } catch (const std::exception& e) {
    const size_t started = workers_.size();
    stop_workers();
    workers_.clear();
    throw Error(str("cannot start ", n_threads, " threads: thread ", started + 2, " could not be created (", e.what(),
                    "; a limit on processes or address space, ulimit -u or -v, may be too low for this many)"));
  }
}

void ThreadPool::stop_workers() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  start_cv_.notify_all();
  for (auto& t : workers_)
    if (t.joinable()) t.join();
}

ThreadPool::~ThreadPool() { stop_workers(); }

void ThreadPool::run_chunks(uint32_t gen) {
  for (;;) {
    uint64_t c = claim_.load(std::memory_order_acquire);
    int64_t chunk;
    for (;;) {
      if (static_cast<uint32_t>(c >> 32) != gen) return;  // a later job: not ours
      chunk = static_cast<int64_t>(c & 0xffffffffu);
      if (chunk >= job_chunks_.load(std::memory_order_acquire)) return;
      if (claim_.compare_exchange_weak(c, c + 1, std::memory_order_acq_rel)) break;
    }
    const int64_t size = job_chunk_.load(std::memory_order_relaxed);
    const int64_t b = chunk * size;
    const int64_t e = std::min(job_n_.load(std::memory_order_relaxed), b + size);
    if (b < e) (*job_.load(std::memory_order_acquire))(b, e);
    done_.fetch_add(1, std::memory_order_acq_rel);
  }
}

void ThreadPool::worker_loop() {
  uint32_t seen = 0;
  for (;;) {
    // Spin a little for the next job, then sleep on the condition variable.
    const auto until = std::chrono::steady_clock::now() + kSpin;
    int spins = 0;
    while (generation_.load(std::memory_order_acquire) == seen && !stop_.load()) {
      cpu_relax();
      if ((++spins & 63) == 0 && std::chrono::steady_clock::now() > until) {
        std::unique_lock<std::mutex> lock(mu_);
        start_cv_.wait(lock, [&] { return stop_.load() || generation_.load() != seen; });
        break;
      }
    }
    if (stop_.load()) return;
    seen = generation_.load(std::memory_order_acquire);
    run_chunks(seen);
  }
}

void ThreadPool::parallel_for(int64_t n, int64_t grain,
                              const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(1, grain);
  const int threads = size();
  if (threads == 1 || n <= grain) {
    fn(0, n);
    return;
  }
  // A few chunks per thread so a late or slow thread costs little.
  const int64_t chunks = std::min<int64_t>(4 * threads, (n + grain - 1) / grain);
  const uint32_t gen = generation_.load() + 1;
  // First make the previous job unclaimable: a worker holding a stale view of claim_ then fails
  // its CAS instead of claiming a chunk while the fields below change.
  claim_.store((static_cast<uint64_t>(gen - 1) << 32) | 0xffffffffu, std::memory_order_seq_cst);
  job_.store(&fn, std::memory_order_relaxed);
  job_n_.store(n, std::memory_order_relaxed);
  job_chunk_.store((n + chunks - 1) / chunks, std::memory_order_relaxed);
  job_chunks_.store(chunks, std::memory_order_relaxed);
  done_.store(0, std::memory_order_relaxed);
  claim_.store(static_cast<uint64_t>(gen) << 32, std::memory_order_release);
  {
    std::lock_guard<std::mutex> lock(mu_);
    generation_.store(gen, std::memory_order_release);
  }
  start_cv_.notify_all();
  run_chunks(gen);
  // Every chunk is claimed; wait for the ones other threads are still running.
  for (int spins = 0; done_.load(std::memory_order_acquire) != chunks; ++spins) {
    if (spins < 4096) cpu_relax();
    else std::this_thread::yield();
  }
}

namespace {
std::unique_ptr<ThreadPool>& global_slot() {
  static std::unique_ptr<ThreadPool> pool;
  return pool;
}
std::mutex g_global_mu;
}  // namespace

ThreadPool& ThreadPool::global() {
  std::lock_guard<std::mutex> lock(g_global_mu);
  auto& p = global_slot();
  if (!p) p = std::make_unique<ThreadPool>(0);
  return *p;
}

void ThreadPool::set_global_threads(int n_threads) {
  std::lock_guard<std::mutex> lock(g_global_mu);
  global_slot() = std::make_unique<ThreadPool>(n_threads);
}

}  // namespace qf
