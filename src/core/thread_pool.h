// A fixed pool of worker threads for data-parallel loops (the CPU kernels' only threading).
// Chunks are claimed dynamically, so when a worker is slow to wake (the machine is busy) the
// caller simply runs its chunks. Workers spin briefly before sleeping: a decode step issues dozens
// of short loops back to back, and a futex wake-up per loop would cost more than the work.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace qf {

class ThreadPool {
 public:
  // n_threads <= 0: one per hardware thread. Starts every worker or none: when one cannot be
  // created, the started ones are joined and a qf::Error naming the thread count is thrown.
  explicit ThreadPool(int n_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return static_cast<int>(workers_.size()) + 1; }

  // Splits [0, n) into contiguous chunks of at least `grain` items and runs fn(begin, end) on
  // them; the calling thread takes part. Returns when every chunk is done. Not reentrant.
  void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

  static ThreadPool& global();                  // sized by set_global_threads or the hardware
  static void set_global_threads(int n_threads);

  // Tests only: called with the worker's index before each worker is created; a hook that throws
  // stands for a thread that cannot be created. An empty function removes it.
  static void set_spawn_hook_for_testing(std::function<void(int)> hook);

 private:
  void worker_loop();
  void stop_workers();  // sets stop_, wakes and joins every worker
  // Claims and runs chunks of job `gen` until none is left.
  void run_chunks(uint32_t gen);

  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable start_cv_;
  // The current job. Written only while no chunk of the previous one can still be claimed.
  std::atomic<const std::function<void(int64_t, int64_t)>*> job_{nullptr};
  std::atomic<int64_t> job_n_{0}, job_chunk_{0}, job_chunks_{0};
  // High 32 bits: job generation; low 32 bits: next unclaimed chunk. One CAS claims a chunk of
  // exactly the job a worker woke up for.
  std::atomic<uint64_t> claim_{0};
  std::atomic<int64_t> done_{0};
  std::atomic<uint32_t> generation_{0};
  std::atomic<bool> stop_{false};
};

}  // namespace qf
