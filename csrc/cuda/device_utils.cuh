// Device helpers of the gate's CUDA kernels: vector packs, warp and block sums, dynamic shared
// memory. No CUDA runtime header: the C++ tests compile the kernels on the host with an emulator
// of these built-ins (RA_EMULATED_DEVICE), so the CPU suite covers the kernels' indexing too.
#pragma once

#include <c10/macros/Macros.h>

#include <cstddef>
#include <cstdint>

namespace retrieval_attention::cuda {

constexpr int kWarpSize = 32;
constexpr int kVectorBytes = 16;  // one 128-bit load or store per thread and step

// kVec elements of T moved as one aligned access.
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

#ifdef RA_EMULATED_DEVICE
// The emulator fails the test where a GPU would fault on a misaligned vector access.
#define RA_CHECK_ALIGNED(p, bytes) ::emu::check_aligned(p, bytes)
#else
#define RA_CHECK_ALIGNED(p, bytes)
#endif

template <typename T, int kVec>
__device__ __forceinline__ Pack<T, kVec> load_pack(const T* p) {
  RA_CHECK_ALIGNED(p, sizeof(Pack<T, kVec>));
  return *reinterpret_cast<const Pack<T, kVec>*>(p);
}

template <typename T, int kVec>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, kVec>& x) {
  RA_CHECK_ALIGNED(p, sizeof(Pack<T, kVec>));
  *reinterpret_cast<Pack<T, kVec>*>(p) = x;
}

// The kVec elements at [p, p + kVec) of a row of D elements, p being m elements past the 16-byte
// grid (0 < m < kVec) at column d: the two aligned packs around them, shifted into place. Nothing
// outside the row is read: its first and last packs load only their part of the row. Not inlined:
// the aligned rows' path stays as lean in registers as if this one did not exist.
template <typename T, int kVec>
__device__ __noinline__ Pack<T, kVec> load_shifted(const T* p, int m, int64_t d, int64_t D) {
  const T* base = p - m;  // on the grid
  Pack<T, kVec> lo, hi, out;
  if (d > 0) {
    lo = load_pack<T, kVec>(base);
  } else {
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      if (i >= m) {
        lo.v[i] = base[i];
      }
    }
  }
  if (d + kVec < D) {
    hi = load_pack<T, kVec>(base + kVec);
  } else {
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      if (i < m) {
        hi.v[i] = base[kVec + i];
      }
    }
  }
  // Every shift spelled out, so each register index is a constant (no local memory).
#pragma unroll
  for (int s = 1; s < kVec; ++s) {
    if (s == m) {
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        out.v[i] = i + s < kVec ? lo.v[i + s] : hi.v[i + s - kVec];
      }
    }
  }
  return out;
}

// The kVec elements at columns [d, d + kVec) of a row of D elements (D a multiple of kVec): one
// 16-byte load, or, for a row off the grid (a view into its storage, rows an odd number of elements
// apart), two (load_shifted).
template <typename T, int kVec>
__device__ __forceinline__ Pack<T, kVec> load_from_row(const T* row, int64_t d, int64_t D) {
  static_assert(kVec == 1 || sizeof(T) * kVec == kVectorBytes, "a pack is one element or 16 bytes");
  const T* p = row + d;
  const int m = static_cast<int>(reinterpret_cast<uintptr_t>(p) / sizeof(T) % kVec);
  if (m == 0) {
    return load_pack<T, kVec>(p);
  }
  return load_shifted<T, kVec>(p, m, d, D);
}

// kN accumulators (float or double) in 16-byte pieces; scalar when they make less than 16 bytes.
template <typename T, int kN>
__device__ __forceinline__ void load_acc(const T* p, T (&x)[kN]) {
  constexpr int kPiece = kVectorBytes / static_cast<int>(sizeof(T));
  if constexpr (kN % kPiece == 0) {
#pragma unroll
    for (int j = 0; j < kN; j += kPiece) {
      const auto piece = load_pack<T, kPiece>(p + j);
#pragma unroll
      for (int i = 0; i < kPiece; ++i) {
        x[j + i] = piece.v[i];
      }
    }
  } else {
#pragma unroll
    for (int i = 0; i < kN; ++i) {
      x[i] = p[i];
    }
  }
}

template <typename T, int kN>
__device__ __forceinline__ void store_acc(T* p, const T (&x)[kN]) {
  constexpr int kPiece = kVectorBytes / static_cast<int>(sizeof(T));
  if constexpr (kN % kPiece == 0) {
#pragma unroll
    for (int j = 0; j < kN; j += kPiece) {
      Pack<T, kPiece> piece;
#pragma unroll
      for (int i = 0; i < kPiece; ++i) {
        piece.v[i] = x[j + i];
      }
      store_pack<T, kPiece>(p + j, piece);
    }
  } else {
#pragma unroll
    for (int i = 0; i < kN; ++i) {
      p[i] = x[i];
    }
  }
}

// The block's dynamic shared memory (sized at launch), as T.
template <typename T>
__device__ __forceinline__ T* shared_memory() {
#ifdef RA_EMULATED_DEVICE
  return reinterpret_cast<T*>(::emu::shared_bytes());
#else
  extern __shared__ __align__(16) unsigned char ra_shared_bytes[];
  return reinterpret_cast<T*>(ra_shared_bytes);
#endif
}

// The sum over the warp, in a fixed butterfly order; every lane gets it.
template <typename T>
__device__ __forceinline__ T warp_sum(T x) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    x += __shfl_xor_sync(0xffffffffu, x, offset);
  }
  return x;
}

// Sums kN values over the block; every thread gets the same totals (lane 0 of each warp publishes
// its warp's sum, then all threads add the warps in order). scratch holds kN * kWarps values and is
// read after the one barrier: callers alternate two scratch buffers, so no second barrier is needed.
template <int kThreads, int kN, typename T>
__device__ __forceinline__ void block_sum(T (&vals)[kN], T* scratch) {
  constexpr int kWarps = kThreads / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
#pragma unroll
  for (int i = 0; i < kN; ++i) {
    vals[i] = warp_sum(vals[i]);
    if (lane == 0) {
      scratch[i * kWarps + warp] = vals[i];
    }
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < kN; ++i) {
    T total = scratch[i * kWarps];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) {
      total += scratch[i * kWarps + w];
    }
    vals[i] = total;
  }
}

constexpr int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

}  // namespace retrieval_attention::cuda
