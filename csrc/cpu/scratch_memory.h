// Scratch memory of the CPU kernels that starts on a 64-byte cache line, on every thread.
//
// malloc aligns to 16 bytes, and each thread allocates from its own arena, so the offsets of the same
// buffers within their cache lines differed between threads: in the attention forward (bf16 on AMX,
// 2 threads, Xeon) the thread whose rows and tiles straddled lines ran each task ~15 % slower, the
// dynamic split gave it fewer tasks, and the call waited for it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <new>
#include <type_traits>
#include <vector>

#include "../cpu_isa.h"

namespace attnkernels {
namespace cpu {
inline namespace ATTNKERNELS_CPU_ISA {  // see cpu_isa.h

constexpr std::align_val_t kScratchAlignment{64};

template <typename T>
struct CacheLineAllocator {
  using value_type = T;
  CacheLineAllocator() = default;
  template <typename U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), kScratchAlignment)); }
  void deallocate(T* p, size_t) { ::operator delete(p, kScratchAlignment); }
  template <typename U>
  bool operator==(const CacheLineAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const CacheLineAllocator<U>&) const { return false; }
};

// A zero-initialised buffer that starts on a cache line.
template <typename T>
using AlignedVector = std::vector<T, CacheLineAllocator<T>>;

// A thread's scratch buffer of n elements, left uninitialised (std::vector zeroes its elements, a pass
// over up to a few MiB per thread and call that a short call, 256 queries x 256 keys, felt), starting
// on a cache line. Whoever reads an element writes it first.
template <typename T>
class ScratchBuffer {
 public:
  explicit ScratchBuffer(int64_t n = 0) : data_(n > 0 ? allocate(n) : nullptr), size_(n) {}
  T* data() { return data_.get(); }
  const T* data() const { return data_.get(); }
  T* begin() { return data_.get(); }
  T* end() { return data_.get() + size_; }
  const T* begin() const { return data_.get(); }
  const T* end() const { return data_.get() + size_; }
  int64_t size() const { return size_; }
  T& operator[](int64_t i) { return data_[static_cast<size_t>(i)]; }
  const T& operator[](int64_t i) const { return data_[static_cast<size_t>(i)]; }

 private:
  static_assert(std::is_trivially_default_constructible_v<T> && std::is_trivially_destructible_v<T>,
                "scratch elements are raw memory");
  struct Free {
    void operator()(T* p) const { ::operator delete(p, kScratchAlignment); }
  };
  static T* allocate(int64_t n) {
    return static_cast<T*>(::operator new(static_cast<size_t>(n) * sizeof(T), kScratchAlignment));
  }
  std::unique_ptr<T[], Free> data_;
  int64_t size_;
};

}  // namespace ATTNKERNELS_CPU_ISA
}  // namespace cpu
}  // namespace attnkernels
