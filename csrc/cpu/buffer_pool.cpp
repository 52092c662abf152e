// The CPU engine's buffer pool (see buffer_pool.h).
#include "buffer_pool.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

namespace rnnfast {

namespace {
constexpr size_t kPageBytes = 4096;
}  // namespace

BufferPool& BufferPool::instance() {
  // Never destroyed: tensors from the pool may be freed after static destructors have run.
  static BufferPool* pool = new BufferPool();
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
    if (found != free_by_size_.end() && !found->second.empty()) {
      block = found->second.back();
      found->second.pop_back();
      cached_bytes_ -= block->bytes;
      --cached_blocks_;
    }
  }
  if (block == nullptr) block = new Block{c10::alloc_cpu(block_bytes), block_bytes};
  // Reported as torch's CPU allocator reports its blocks: the profiler's memory events.
  c10::profiledCPUMemoryReporter().New(block->data, bytes);
  return {block->data, block, &BufferPool::release, c10::Device(c10::DeviceType::CPU)};
}

void BufferPool::release(void* block) {
  instance().give_back(static_cast<Block*>(block));
}

void BufferPool::give_back(Block* block) {
  c10::profiledCPUMemoryReporter().Delete(block->data);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (cached_bytes_ + block->bytes <= kMaxCachedBytes) {
      free_by_size_[block->bytes].push_back(block);
      cached_bytes_ += block->bytes;
      ++cached_blocks_;
      return;
    }
  }
  c10::free_cpu(block->data);
  delete block;
}

void BufferPool::empty_cache() {
  std::unordered_map<size_t, std::vector<Block*>> blocks;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    blocks.swap(free_by_size_);
    cached_bytes_ = 0;
    cached_blocks_ = 0;
  }
  for (auto& [bytes, list] : blocks) {
    for (Block* block : list) {
      c10::free_cpu(block->data);
      delete block;
    }
  }
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

}  // namespace rnnfast
