// SIMT emulation: runs the generated CUDA kernels on the CPU, for tests on machines
// without a GPU. A block's threads are fibers (ucontext) on one OS thread, switched
// only at __syncthreads and __shfl_down_sync, which wait until every thread of the
// block (or lane of the warp) has arrived; blocks run one after another. A barrier
// that some thread never reaches (divergence, or an exit past it) is an error, not a
// hang. What this cannot show: the memory model, timing, or anything nvcc-specific.
//
// Prepended to a generated .cu with LOPT_SIMT defined (tests/test_cuda_simt.py).
#pragma once
#include <ucontext.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static  // one block runs at a time
#define LOPT_DYNAMIC_SHARED(type, name) type* name = reinterpret_cast<type*>(lopt_simt::dynamic_shared())

namespace lopt_simt {

struct Dim { unsigned x = 0, y = 0, z = 0; };
inline Dim threadIdx, blockIdx, blockDim;

constexpr int kMaxThreads = 1024;
constexpr size_t kStack = 256 * 1024;

struct Block {
  struct Fiber { ucontext_t context; bool done = false; };
  std::vector<Fiber> fibers;
  std::vector<char> stacks;
  ucontext_t scheduler;
  int current = 0;
  void (*body)(void*) = nullptr;
  void* arg = nullptr;
  uint64_t progress = 0;                      // barrier releases and exits so far
  uint64_t block_generation = 0;
  int block_arrived = 0;
  std::vector<uint64_t> warp_generation;
  std::vector<int> warp_arrived;
  std::vector<float> lanes[2];                // shuffle values by generation parity
  std::vector<float> shared;                  // dynamic shared memory
};
inline Block block;

inline void* dynamic_shared() { return block.shared.data(); }

inline void yield() { swapcontext(&block.fibers[block.current].context, &block.scheduler); }

inline void fiber_main() {
  block.body(block.arg);
  block.fibers[block.current].done = true;
  ++block.progress;
}

// Runs `body(arg)` as `blocks` blocks of `threads` threads.
inline void launch(int64_t blocks, int threads, size_t shared_bytes, void (*body)(void*), void* arg) {
  if (threads % 32 != 0 || threads > kMaxThreads) throw std::invalid_argument("simt: threads must be 32k <= 1024");
  block.fibers.assign(threads, {});
  block.stacks.resize(threads * kStack);
  block.shared.assign(shared_bytes / sizeof(float) + 1, 0.0f);
  block.body = body;
  block.arg = arg;
  blockDim.x = threads;
  for (int64_t b = 0; b < blocks; ++b) {
    blockIdx.x = static_cast<unsigned>(b);
    block.block_arrived = 0;
    block.warp_generation.assign(threads / 32, 0);
    block.warp_arrived.assign(threads / 32, 0);
    block.lanes[0].assign(threads, 0.0f);
    block.lanes[1].assign(threads, 0.0f);
    for (int i = 0; i < threads; ++i) {
      auto& f = block.fibers[i];
      f.done = false;
      getcontext(&f.context);
      f.context.uc_stack.ss_sp = block.stacks.data() + i * kStack;
      f.context.uc_stack.ss_size = kStack;
      f.context.uc_link = &block.scheduler;
      makecontext(&f.context, fiber_main, 0);
    }
    for (int done = 0; done < threads;) {
      const uint64_t before = block.progress;
      done = 0;
      for (int i = 0; i < threads; ++i) {
        if (block.fibers[i].done) { ++done; continue; }
        block.current = i;
        threadIdx.x = static_cast<unsigned>(i);
        swapcontext(&block.scheduler, &block.fibers[i].context);
      }
      if (done < threads && block.progress == before)
        throw std::runtime_error("simt: block " + std::to_string(b) + ": threads wait at a barrier that the others "
                                 "never reach (divergent __syncthreads or __shfl_down_sync)");
    }
  }
}

// Waits until `arrived` reaches `count` (the last arrival starts a new generation).
inline void barrier(uint64_t& generation, int& arrived, int count) {
  const uint64_t mine = generation;
  if (++arrived == count) {
    arrived = 0;
    ++generation;
    ++block.progress;
    return;
  }
  while (generation == mine) yield();
}

}  // namespace lopt_simt

using lopt_simt::blockDim;
using lopt_simt::blockIdx;
using lopt_simt::threadIdx;

inline void __syncthreads() {
  lopt_simt::barrier(lopt_simt::block.block_generation, lopt_simt::block.block_arrived,
                     static_cast<int>(lopt_simt::blockDim.x));
}

inline float __shfl_down_sync(unsigned mask, float value, int delta) {
  if (mask != 0xffffffffu) throw std::invalid_argument("simt: only full-warp shuffles are emulated");
  auto& b = lopt_simt::block;
  const int lane = static_cast<int>(threadIdx.x % 32), warp = static_cast<int>(threadIdx.x / 32);
  // Values go to the buffer of this shuffle's generation parity: a lane that runs ahead
  // writes the next shuffle's values without overwriting ones not yet read.
  std::vector<float>& lanes = b.lanes[b.warp_generation[warp] & 1];
  lanes[threadIdx.x] = value;
  lopt_simt::barrier(b.warp_generation[warp], b.warp_arrived[warp], 32);
  return lane + delta < 32 ? lanes[warp * 32 + lane + delta] : value;
}
