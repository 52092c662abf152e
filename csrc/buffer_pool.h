// Memory for the CPU engine's large tensors (its outputs and buffers), kept for reuse when they
// are freed instead of going back to the C library.
//
// A training step of a layer allocates the same large tensors every time (the workspace, the
// gate gradients, the weight gradients, which become .grad and are freed by the next
// zero_grad). glibc returns such memory to the system once the free space at the top of its
// heap passes its trim threshold, and then every page of the next step's tensors is a page
// fault on first touch: measured hundreds per step for the course's 2-layer GRU, a quarter of
// its training step. Blocks from here are handed out again at the same size instead.
//
// The pool is an at::Allocator: a tensor from it is an ordinary CPU tensor (resizable; the
// profiler sees its allocation and its free, as it sees those of torch's own CPU allocator, so
// memory measurements count it the same). Freed blocks are kept up to kMaxCachedBytes in all;
// to make room for a newly freed block, those freed longest ago go back to the system first, so
// that the sizes of the layers in use now, not those of earlier ones, stay cached. empty_cache()
// gives them all back.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Allocator.h>

#include <cstddef>
#include <list>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace rnnfast {

class BufferPool final : public c10::Allocator {
 public:
  // Requests below this size go to torch's CPU allocator: glibc keeps small blocks in its bins.
  static constexpr size_t kMinBlockBytes = size_t(64) << 10;
  // Larger ones too: their work dwarfs the faults of their pages.
  static constexpr size_t kMaxBlockBytes = size_t(64) << 20;
  // Free blocks kept for reuse, in all (about a layer's training step at the grid's largest
  // sizes); a block freed past it goes back to the system.
  static constexpr size_t kMaxCachedBytes = size_t(128) << 20;

  static BufferPool& instance();

  c10::DataPtr allocate(size_t bytes) override;
  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  // Gives every free block back to the system.
  void empty_cache();
  // Bytes and blocks kept free for reuse.
  size_t cached_bytes();
  size_t cached_blocks();

 private:
  struct Block {
    void* data;
    size_t bytes;  // the block's size (the request rounded up to whole pages)
    std::list<Block*>::iterator in_free_order;  // its place in free_order_ while cached
  };
  static void release(void* block);
  void give_back(Block* block);
  // Takes the block freed longest ago out of the cache (the caller holds mutex_).
  Block* evict_oldest();

  std::mutex mutex_;
  // Cached blocks by size, each list in the order they were freed (the last freed last); no
  // entry for a size without any.
  std::unordered_map<size_t, std::vector<Block*>> free_by_size_;
  // All cached blocks, the one freed longest ago first.
  std::list<Block*> free_order_;
  size_t cached_bytes_ = 0;
  size_t cached_blocks_ = 0;
};

// An uninitialised CPU tensor whose memory comes from the BufferPool (as at::empty otherwise).
at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options);

// A tensor of zeros for the small buffers a call starts from (zero states and their gradients):
// on the CPU written by memset, where at::zeros fills through a TensorIterator (about 2 us each
// for the few a call makes); elsewhere at::zeros.
at::Tensor zeros_by_memset(at::IntArrayRef sizes, const at::TensorOptions& options);

}  // namespace rnnfast
