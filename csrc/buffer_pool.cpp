// The CPU engine's buffer pool (see buffer_pool.h).
#include "buffer_pool.h"

#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <cstring>

#if defined(__GLIBC__)
#include <malloc.h>  // malloc_trim
#endif
#if __has_include(<pthread.h>)
#include <pthread.h>  // pthread_atfork
#endif

namespace rnnfast {

namespace {
constexpr size_t kPageBytes = 4096;
}  // namespace

BufferPool& BufferPool::instance() {
  // Never destroyed: tensors from the pool may be freed after static destructors have run.
  static BufferPool* pool = [] {
    BufferPool* made = new BufferPool();
#if __has_include(<pthread.h>)
    // A process forked while another thread holds the pool's mutex would inherit it locked, and
    // its first allocation would wait forever (a DataLoader worker forked beside a thread that
    // runs a layer). fork() takes the mutex first, so it is free in both processes after.
    pthread_atfork([] { instance().mutex_.lock(); }, [] { instance().mutex_.unlock(); },
                   [] { instance().mutex_.unlock(); });
#endif
    return made;
  }();
  return *pool;
}

c10::DataPtr BufferPool::allocate(size_t bytes) {
  if (bytes < kMinBlockBytes || bytes > kMaxBlockBytes) {
    return c10::GetCPUAllocator()->allocate(bytes);
  }
  const size_t block_bytes = (bytes + kPageBytes - 1) / kPageBytes * kPageBytes;
  Block* block = nullptr;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    auto found = free_by_size_.find(block_bytes);
    if (found != free_by_size_.end()) {
      block = found->second.back();
      found->second.pop_back();
      if (found->second.empty()) free_by_size_.erase(found);
      free_order_.erase(block->in_free_order);
      cached_bytes_ -= block->bytes;
      --cached_blocks_;
    }
  }
  if (block == nullptr) block = new Block{c10::alloc_cpu(block_bytes), block_bytes, {}};
  // Reported as torch's CPU allocator reports its blocks: the profiler's memory events.
  c10::profiledCPUMemoryReporter().New(block->data, bytes);
  return {block->data, block, &BufferPool::release, c10::Device(c10::DeviceType::CPU)};
}

void BufferPool::release(void* block) { instance().give_back(static_cast<Block*>(block)); }

void BufferPool::give_back(Block* block) {
  c10::profiledCPUMemoryReporter().Delete(block->data);
  std::vector<Block*> evicted;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    while (cached_bytes_ + block->bytes > kMaxCachedBytes && !free_order_.empty()) {
      evicted.push_back(evict_oldest());
    }
    free_by_size_[block->bytes].push_back(block);
    block->in_free_order = free_order_.insert(free_order_.end(), block);
    cached_bytes_ += block->bytes;
    ++cached_blocks_;
  }
  // Out of the lock: giving memory back to the system takes a while.
  for (Block* old : evicted) {
    c10::free_cpu(old->data);
    delete old;
  }
}

BufferPool::Block* BufferPool::evict_oldest() {
  Block* oldest = free_order_.front();
  free_order_.pop_front();
  // The oldest block of all is the oldest of its size: the first of its list. A size without
  // blocks leaves the map (a process running many sizes would otherwise keep one entry each).
  const auto same_size = free_by_size_.find(oldest->bytes);
  same_size->second.erase(same_size->second.begin());
  if (same_size->second.empty()) free_by_size_.erase(same_size);
  cached_bytes_ -= oldest->bytes;
  --cached_blocks_;
  return oldest;
}

void BufferPool::empty_cache() {
  std::list<Block*> blocks;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    blocks.swap(free_order_);
    free_by_size_.clear();
    cached_bytes_ = 0;
    cached_blocks_ = 0;
  }
  for (Block* block : blocks) {
    c10::free_cpu(block->data);
    delete block;
  }
#if defined(__GLIBC__)
  // glibc keeps freed blocks below its (adaptive) mmap threshold in its heap, where they stay
  // part of the process's resident memory; malloc_trim hands their pages back to the system.
  malloc_trim(0);
#endif
}

size_t BufferPool::cached_bytes() {
  std::lock_guard<std::mutex> lock(mutex_);
  return cached_bytes_;
}

size_t BufferPool::cached_blocks() {
  std::lock_guard<std::mutex> lock(mutex_);
  return cached_blocks_;
}

at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  if (!options.device().is_cpu()) return at::empty(sizes, options);
  return at::Tensor(at::detail::empty_generic(
      sizes, &BufferPool::instance(), c10::DispatchKeySet(c10::DispatchKey::CPU),
      c10::typeMetaToScalarType(options.dtype()), std::nullopt));
}

at::Tensor zeros_by_memset(at::IntArrayRef sizes, const at::TensorOptions& options) {
  if (!options.device().is_cpu()) return at::zeros(sizes, options);
  at::Tensor zeros = at::detail::empty_cpu(sizes, options);
  if (zeros.nbytes() > 0) std::memset(zeros.data_ptr(), 0, zeros.nbytes());
  return zeros;
}

}  // namespace rnnfast
