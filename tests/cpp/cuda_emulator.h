// Runs the project's CUDA kernels on the host: one std::thread per CUDA thread, one block after
// another, with real barriers for __syncthreads and warp shuffles, and the block's dynamic shared
// memory in host memory. It checks what the kernels' own code decides (indexing, the split of work
// over threads and blocks, barriers, reductions, alignment of vector accesses), not timing or the
// memory model. Include it after the torch headers and before a csrc/cuda/*_kernel.cuh header.
#pragma once

#define RA_EMULATED_DEVICE 1

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

namespace emu {

constexpr int kWarp = 32;
constexpr size_t kSharedAlignment = 128;

struct Index {
  unsigned int x = 0, y = 0, z = 0;
};

inline thread_local Index thread_index;
inline thread_local Index block_index;
inline Index block_dim;
inline Index grid_dim;

class Barrier {
 public:
  explicit Barrier(int count) : count_(count) {}

  void wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const uint64_t generation = generation_;
    if (++arrived_ == count_) {
      arrived_ = 0;
      ++generation_;
      released_.notify_all();
    } else {
      released_.wait(lock, [&] { return generation_ != generation; });
    }
  }

 private:
  std::mutex mutex_;
  std::condition_variable released_;
  int count_;
  int arrived_ = 0;
  uint64_t generation_ = 0;
};

// What the threads of one block share.
struct Block {
  Block(int threads, size_t shared_bytes)
      : barrier(threads),
        lanes(static_cast<size_t>(threads)),
        shared(static_cast<unsigned char*>(std::aligned_alloc(kSharedAlignment, round(shared_bytes))), &std::free) {
    for (int w = 0; w < threads / kWarp; ++w) {
      warps.push_back(std::make_unique<Barrier>(kWarp));
    }
    // Garbage, as on a GPU: a kernel that reads shared memory before writing it gets noise, not zeros.
    std::memset(shared.get(), 0xA5, round(shared_bytes));
  }

  static size_t round(size_t bytes) { return (bytes / kSharedAlignment + 1) * kSharedAlignment; }

  Barrier barrier;
  std::vector<std::unique_ptr<Barrier>> warps;
  std::vector<uint64_t> lanes;  // one shuffle slot per thread
  std::unique_ptr<unsigned char, decltype(&std::free)> shared;
};

inline thread_local Block* current_block = nullptr;
inline std::atomic<int64_t> misaligned_accesses{0};

inline unsigned char* shared_bytes() { return current_block->shared.get(); }

inline void check_aligned(const void* p, size_t bytes) {
  if (reinterpret_cast<uintptr_t>(p) % bytes != 0) {
    ++misaligned_accesses;
  }
}

inline void syncthreads() { current_block->barrier.wait(); }

// Every lane of the warp publishes its value, then reads its partner's.
template <typename T>
T shfl_xor(unsigned int /*mask*/, T value, int offset) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "a shuffle moves at most 8 bytes");
  const unsigned int lane = thread_index.x % kWarp;
  const unsigned int warp = thread_index.x / kWarp;
  Barrier& barrier = *current_block->warps[warp];
  uint64_t* slots = current_block->lanes.data() + warp * kWarp;
  std::memcpy(&slots[lane], &value, sizeof(T));
  barrier.wait();
  T partner;
  std::memcpy(&partner, &slots[lane ^ static_cast<unsigned int>(offset)], sizeof(T));
  barrier.wait();
  return partner;
}

// The launcher the kernels' run_* functions take: `resident_blocks` stands for the GPU's
// SMs x occupancy, `shared_budget` for the per-block limit the kernels plan with, and
// `shared_limit` for the one a launch must respect (a test lowers the first to move data out).
struct Launcher {
  int64_t resident_blocks = 3;
  size_t shared_budget = 227 * 1024;
  size_t shared_limit = 227 * 1024;
  int64_t launches = 0;

  size_t smem_budget() const { return shared_budget; }

  template <typename... Params>
  int64_t max_blocks(void (*)(Params...), int, size_t) const {
    return resident_blocks;
  }

  template <typename... Params, typename... Args>
  void operator()(void (*kernel)(Params...), int64_t grid, int threads, size_t bytes, Args&&... args) {
    if (grid < 1 || threads < 1 || threads % kWarp != 0 || bytes > shared_limit) {
      throw std::invalid_argument("emulated launch: grid " + std::to_string(grid) + ", threads " +
                                  std::to_string(threads) + ", shared bytes " + std::to_string(bytes));
    }
    ++launches;
    grid_dim = {static_cast<unsigned int>(grid), 1, 1};
    block_dim = {static_cast<unsigned int>(threads), 1, 1};
    for (int64_t b = 0; b < grid; ++b) {
      Block block(threads, bytes);
      std::vector<std::thread> pool;
      pool.reserve(static_cast<size_t>(threads));
      for (int t = 0; t < threads; ++t) {
        pool.emplace_back([&, t, b] {
          current_block = &block;
          thread_index = {static_cast<unsigned int>(t), 0, 0};
          block_index = {static_cast<unsigned int>(b), 0, 0};
          kernel(args...);
        });
      }
      for (auto& thread : pool) {
        thread.join();
      }
    }
  }
};

}  // namespace emu

#define threadIdx (::emu::thread_index)
#define blockIdx (::emu::block_index)
#define blockDim (::emu::block_dim)
#define gridDim (::emu::grid_dim)
#define __syncthreads() ::emu::syncthreads()
#define __shfl_xor_sync(mask, value, offset) ::emu::shfl_xor(mask, value, offset)
