// SM-driven fragment copies for the WorldKV copy engine.
//
// A transfer is a list of fragments (src, dst, nbytes): for example one per (layer, K/V, page) when
// a chunk moves between the paged pools and a bank slot in mapped pinned host memory. With unified
// addressing a pinned host pointer is a valid device pointer, so one kernel reads pool pages and
// writes host memory directly (or the reverse), with no staging and no per-fragment DMA call. This
// wins for many small fragments, where copy-engine DMA collapses (DESIGN §2); large contiguous runs
// should still go to the copy engines.
//
// Work split: fragment f is cut into ceil(nbytes / chunk_bytes) work items; chunk_start holds the
// exclusive prefix sum of those counts (num_frags + 1 entries). Blocks walk the work items
// grid-stride, so the caller caps the grid (a few SMs' worth of blocks) to leave the model its SMs.
//
// Descriptor table (one device buffer of u64, uploaded once per transfer):
//   [0, n)        source addresses
//   [n, 2n)       destination addresses
//   [2n, 3n)      sizes in bytes
//   [3n, 4n + 1)  chunk_start prefix
//
// No #include: NVRTC (CuPy RawModule) compiles this without host headers, and plain nvcc does too.

typedef unsigned long long u64;

// Copy `count` elements of T: every thread strides by the block size (coalesced).
template <typename T>
__device__ __forceinline__ void copy_elems(const char* __restrict__ src, char* __restrict__ dst, u64 count) {
  const T* s = reinterpret_cast<const T*>(src);
  T* d = reinterpret_cast<T*>(dst);
  for (u64 i = threadIdx.x; i < count; i += blockDim.x) {
    d[i] = s[i];
  }
}

// Copy n bytes with the widest access both pointers' alignment allows (16, 8, 4 bytes), then the
// tail byte by byte. Alignment is checked on the actual addresses, so any offset is correct.
__device__ __forceinline__ void copy_span(const char* __restrict__ src, char* __restrict__ dst, u64 n) {
  const u64 align = reinterpret_cast<u64>(src) | reinterpret_cast<u64>(dst);
  u64 body = 0;
  if ((align & 15ull) == 0) {
    body = n & ~15ull;
    copy_elems<int4>(src, dst, body >> 4);
  } else if ((align & 7ull) == 0) {
    body = n & ~7ull;
    copy_elems<u64>(src, dst, body >> 3);
  } else if ((align & 3ull) == 0) {
    body = n & ~3ull;
    copy_elems<unsigned int>(src, dst, body >> 2);
  }
  copy_elems<unsigned char>(src + body, dst + body, n - body);
}

extern "C" __global__ void wkv_copy_fragments(const u64* __restrict__ desc, int num_frags, u64 chunk_bytes) {
  if (num_frags <= 0) {
    return;
  }
  const u64* src = desc;
  const u64* dst = desc + num_frags;
  const u64* sizes = desc + 2 * (u64)num_frags;
  const u64* chunk_start = desc + 3 * (u64)num_frags;
  const u64 total = chunk_start[num_frags];
  for (u64 w = blockIdx.x; w < total; w += gridDim.x) {
    // largest f with chunk_start[f] <= w: skips zero-size fragments (their start equals the next one's)
    int lo = 0;
    int hi = num_frags - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) >> 1;
      if (chunk_start[mid] <= w) {
        lo = mid;
      } else {
        hi = mid - 1;
      }
    }
    const u64 offset = (w - chunk_start[lo]) * chunk_bytes;
    u64 n = sizes[lo] - offset;
    if (n > chunk_bytes) {
      n = chunk_bytes;
    }
    copy_span(reinterpret_cast<const char*>(src[lo]) + offset, reinterpret_cast<char*>(dst[lo]) + offset, n);
  }
}
