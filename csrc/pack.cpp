// specctl record packer: a plain C ABI over raw pointers and sizes (see csrc/README.md).
//
// One pass over the hidden states: gather the k aux layers (and the last hidden state)
// row by row into the record buffer, converting fp32 -> bf16 with round-to-nearest-even
// (NaN -> 0x7FC0, denormals kept: the same bits as specctl.pack's torch path), and
// CRC32C each freshly written 4 KiB block while it is still in L1. Large sections are
// split by rows over threads; the per-thread CRCs are joined with a CRC32C "combine" so
// the section CRC is exactly the CRC of its bytes.
//
// Built at install time by setup.py with the system compiler for baseline x86-64; the
// SSE4.2, AVX2, AVX-512BW and VPCLMULQDQ paths are compiled per function and chosen at
// run time, so one build runs on every x86-64 machine. No libtorch, no Python C API: the
// Python side loads it with ctypes, which releases the GIL for the call.

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SPECCTL_X86 1
#endif

#define API extern "C" __attribute__((visibility("default")))

namespace {

constexpr uint32_t kPoly = 0x82F63B78u;  // CRC32C, reflected
constexpr int kBf16 = 1, kFp32 = 2;       // protocol dtype codes
constexpr size_t kStreamBytes = 512;      // per-stream block of the 3-way hardware CRC
constexpr size_t kBlockBytes = 4096;      // output staged in L1 before CRC and copy-out
uint64_t g_stream_min = 32 << 20;  // hidden bytes from which stores bypass the cache
constexpr size_t kBytesPerThread = 2 << 20;  // hidden bytes per extra thread
constexpr size_t kPrefetch = 2048;  // bytes ahead for software prefetch

// ------------------------------------------------------------------ CRC32C primitives
// "raw" CRC state: no pre/post inversion. crc32c(data) = ~raw(~0, data).
// raw(s, A||B) = shift(raw(s, A), |B|) ^ raw(0, B), shift(s, n) = s * x^(8n) mod P.

uint32_t g_table[256];
uint32_t g_x2n[32];             // x^(2^k) mod P
uint32_t g_shift_tab[4][256];   // shift by kStreamBytes, as a byte-sliced linear map
bool g_hw_crc = false, g_avx2 = false, g_avx512 = false, g_vpclmul = false;
unsigned g_cores = 0;  // hardware_concurrency() reads sysfs (~6 us): once, at init

uint32_t multmodp(uint32_t a, uint32_t b) {  // a * b mod P, reflected bit order
  uint32_t m = 1u << 31, p = 0;
  for (;;) {
    if (a & m) {
      p ^= b;
      if ((a & (m - 1)) == 0) break;
    }
    m >>= 1;
    b = (b & 1) ? (b >> 1) ^ kPoly : b >> 1;
  }
  return p;
}

uint32_t x8nmodp(uint64_t n) {  // x^(8n) mod P
  uint32_t p = 1u << 31;        // x^0
  for (int k = 3; n; n >>= 1, k++)
    if (n & 1) p = multmodp(g_x2n[k & 31], p);
  return p;
}

uint32_t crc_shift(uint32_t s, uint64_t nbytes) { return multmodp(x8nmodp(nbytes), s); }

uint32_t xpow(uint64_t e) {  // x^e mod P
  uint32_t p = 1u << 31;
  for (int k = 0; e; e >>= 1, k++)
    if (e & 1) p = multmodp(g_x2n[k & 31], p);
  return p;
}

// Folding constants for moving a 128-bit lane D bits ahead with carry-less multiplies:
// {low qword: x^(D+63), high qword: x^(D-1)} mod P, each in the upper half of a qword.
void fold_constants(uint64_t d_bits, uint64_t out[2]) {
  out[0] = static_cast<uint64_t>(xpow(d_bits + 63)) << 32;
  out[1] = static_cast<uint64_t>(xpow(d_bits - 1)) << 32;
}
uint64_t g_fold256[2], g_fold_lanes[6], g_lane_k[3][2];  // 256 B; 192/128/64 B; 48/32/16 B

inline uint32_t shift_stream(uint32_t s) {
  return g_shift_tab[0][s & 0xff] ^ g_shift_tab[1][(s >> 8) & 0xff] ^
         g_shift_tab[2][(s >> 16) & 0xff] ^ g_shift_tab[3][s >> 24];
}

uint32_t crc_raw_sw(uint32_t s, const uint8_t* p, size_t n) {
  while (n--) s = g_table[(s ^ *p++) & 0xff] ^ (s >> 8);
  return s;
}

#ifdef SPECCTL_X86
inline uint64_t load64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}

// crc32 has latency 3 and throughput 1: three independent streams keep the unit busy.
__attribute__((target("sse4.2"))) uint32_t crc_raw_hw(uint32_t s, const uint8_t* p, size_t n) {
  uint64_t c0 = s;
  while (n >= 3 * kStreamBytes) {
    uint64_t c1 = 0, c2 = 0;
    const uint8_t *p1 = p + kStreamBytes, *p2 = p + 2 * kStreamBytes;
    for (size_t i = 0; i < kStreamBytes; i += 64) {
      // Software prefetch: without it one core is DRAM-latency bound (~7 GB/s here).
      _mm_prefetch(reinterpret_cast<const char*>(p + i + kPrefetch), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(p1 + i + kPrefetch), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(p2 + i + kPrefetch), _MM_HINT_T0);
      for (size_t w = i; w < i + 64; w += 8) {
        c0 = _mm_crc32_u64(c0, load64(p + w));
        c1 = _mm_crc32_u64(c1, load64(p1 + w));
        c2 = _mm_crc32_u64(c2, load64(p2 + w));
      }
    }
    uint32_t joined = shift_stream(static_cast<uint32_t>(c0)) ^ static_cast<uint32_t>(c1);
    c0 = shift_stream(joined) ^ static_cast<uint32_t>(c2);
    p += 3 * kStreamBytes;
    n -= 3 * kStreamBytes;
  }
  for (; n >= 8; p += 8, n -= 8) c0 = _mm_crc32_u64(c0, load64(p));
  uint32_t c = static_cast<uint32_t>(c0);
  for (; n; n--) c = _mm_crc32_u8(c, *p++);
  return c;
}

// AVX-512 VPCLMULQDQ folding: four 64-byte accumulators fold 256 bytes per iteration
// (no dependency on the 3-cycle crc32 latency), then fold down to one 128-bit lane whose
// 16 bytes have the same CRC as everything before; crc32 finishes it and the tail.
#define SPECCTL_FOLD_TARGET \
  __attribute__((target("avx512f,avx512bw,vpclmulqdq,pclmul,sse4.2")))
SPECCTL_FOLD_TARGET inline __m512i fold512(__m512i x, __m512i k, __m512i into) {
  return _mm512_ternarylogic_epi64(_mm512_clmulepi64_epi128(x, k, 0x00),
                                   _mm512_clmulepi64_epi128(x, k, 0x11), into, 0x96);
}

SPECCTL_FOLD_TARGET inline __m512i bcast128(const uint64_t k[2]) {
  const auto lo = static_cast<int64_t>(k[0]), hi = static_cast<int64_t>(k[1]);
  return _mm512_set_epi64(hi, lo, hi, lo, hi, lo, hi, lo);
}

SPECCTL_FOLD_TARGET uint32_t crc_raw_fold(uint32_t s, const uint8_t* p, size_t n) {
  // The incoming CRC state is XORed into the first 4 message bytes (reflected CRC).
  const __m512i init = _mm512_castsi128_si512(_mm_cvtsi32_si128(static_cast<int>(s)));
  __m512i x0 = _mm512_xor_si512(_mm512_loadu_si512(p), init);
  __m512i x1 = _mm512_loadu_si512(p + 64);
  __m512i x2 = _mm512_loadu_si512(p + 128);
  __m512i x3 = _mm512_loadu_si512(p + 192);
  p += 256;
  n -= 256;
  const __m512i k256 = bcast128(g_fold256);
  for (; n >= 256; p += 256, n -= 256) {
    _mm_prefetch(reinterpret_cast<const char*>(p) + kPrefetch, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(p) + kPrefetch + 128, _MM_HINT_T0);
    x0 = fold512(x0, k256, _mm512_loadu_si512(p));
    x1 = fold512(x1, k256, _mm512_loadu_si512(p + 64));
    x2 = fold512(x2, k256, _mm512_loadu_si512(p + 128));
    x3 = fold512(x3, k256, _mm512_loadu_si512(p + 192));
  }
  // x0, x1, x2 -> x3 (192, 128, 64 bytes ahead), then lanes 0..2 -> lane 3 (48, 32, 16 B).
  x3 = fold512(x0, bcast128(g_fold_lanes + 0), x3);
  x3 = fold512(x1, bcast128(g_fold_lanes + 2), x3);
  x3 = fold512(x2, bcast128(g_fold_lanes + 4), x3);
  alignas(64) uint64_t lane[8];
  _mm512_store_si512(lane, x3);
  auto q = [](uint64_t hi, uint64_t lo) {
    return _mm_set_epi64x(static_cast<int64_t>(hi), static_cast<int64_t>(lo));
  };
  __m128i acc = q(lane[7], lane[6]);
  for (int i = 0; i < 3; i++) {
    __m128i v = q(lane[2 * i + 1], lane[2 * i]), k = q(g_lane_k[i][1], g_lane_k[i][0]);
    acc = _mm_xor_si128(acc, _mm_xor_si128(_mm_clmulepi64_si128(v, k, 0x00),
                                           _mm_clmulepi64_si128(v, k, 0x11)));
  }
  uint64_t c = _mm_crc32_u64(0, static_cast<uint64_t>(_mm_cvtsi128_si64(acc)));
  c = _mm_crc32_u64(c, static_cast<uint64_t>(_mm_extract_epi64(acc, 1)));
  return crc_raw_hw(static_cast<uint32_t>(c), p, n);
}
#endif  // SPECCTL_X86

uint32_t crc_raw(uint32_t s, const uint8_t* p, size_t n) {
#ifdef SPECCTL_X86
  if (g_vpclmul && n >= 512) return crc_raw_fold(s, p, n);
  if (g_hw_crc) return crc_raw_hw(s, p, n);
#endif
  return crc_raw_sw(s, p, n);
}

void init_once() {
  for (uint32_t b = 0; b < 256; b++) {
    uint32_t c = b;
    for (int i = 0; i < 8; i++) c = (c & 1) ? (c >> 1) ^ kPoly : c >> 1;
    g_table[b] = c;
  }
  g_x2n[0] = 1u << 30;  // x^1
  for (int k = 1; k < 32; k++) g_x2n[k] = multmodp(g_x2n[k - 1], g_x2n[k - 1]);
  fold_constants(256 * 8, g_fold256);
  for (int i = 0; i < 3; i++) {
    fold_constants((192 - 64 * i) * 8, g_fold_lanes + 2 * i);
    fold_constants((48 - 16 * i) * 8, g_lane_k[i]);
  }
  uint32_t k_stream = x8nmodp(kStreamBytes);
  for (int i = 0; i < 4; i++)
    for (uint32_t b = 0; b < 256; b++) g_shift_tab[i][b] = multmodp(k_stream, b << (8 * i));
  g_cores = std::thread::hardware_concurrency();
  if (const char* v = std::getenv("SPECCTL_PACK_STREAM_MIN"))  // tests lower it
    g_stream_min = std::strtoull(v, nullptr, 10);
#ifdef SPECCTL_X86
  __builtin_cpu_init();
  // SPECCTL_PACK_ISA caps the paths used (tests run each one on any AVX-512 machine):
  // scalar | sse4.2 | avx2 | avx512 (no VPCLMULQDQ CRC) | unset: everything the CPU has.
  const char* isa = std::getenv("SPECCTL_PACK_ISA");
  const int cap = !isa || !*isa                   ? 4
                  : std::strcmp(isa, "scalar") == 0 ? 0
                  : std::strcmp(isa, "sse4.2") == 0 ? 1
                  : std::strcmp(isa, "avx2") == 0   ? 2
                                                    : 3;
  g_hw_crc = cap >= 1 && __builtin_cpu_supports("sse4.2");
  g_avx2 = cap >= 2 && __builtin_cpu_supports("avx2");
  g_avx512 = cap >= 3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
  g_vpclmul = cap >= 4 && g_avx512 && g_hw_crc && __builtin_cpu_supports("vpclmulqdq");
#endif
}

std::once_flag g_once;
inline void ensure_init() { std::call_once(g_once, init_once); }

// ------------------------------------------------------------------ dtype conversion
// bf16 = upper 16 bits of fp32 rounded to nearest even; any NaN -> 0x7FC0.
// (Not _mm512_cvtneps_pbh: that one flushes denormals to zero.)

inline uint16_t f32_to_bf16(uint32_t u) {
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

void f32_to_bf16_scalar(const uint32_t* src, uint16_t* dst, size_t n) {
  for (size_t i = 0; i < n; i++) dst[i] = f32_to_bf16(src[i]);
}

#ifdef SPECCTL_X86
__attribute__((target("avx2"))) inline __m256i rne8(__m256i u) {
  const __m256i bias = _mm256_set1_epi32(0x7FFF), one = _mm256_set1_epi32(1);
  const __m256i absmask = _mm256_set1_epi32(0x7FFFFFFF), inf = _mm256_set1_epi32(0x7F800000);
  __m256i r = _mm256_srli_epi32(
      _mm256_add_epi32(u, _mm256_add_epi32(bias, _mm256_and_si256(_mm256_srli_epi32(u, 16), one))),
      16);
  __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, absmask), inf);
  return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
}

__attribute__((target("avx2"))) void f32_to_bf16_avx2(const uint32_t* src, uint16_t* dst,
                                                      size_t n) {
  size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    _mm_prefetch(reinterpret_cast<const char*>(src + i) + kPrefetch, _MM_HINT_T0);
    __m256i a = rne8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i)));
    __m256i b = rne8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i + 8)));
    // packus works per 128-bit lane: a0 b0 a1 b1 -> reorder to a0 a1 b0 b1.
    __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(a, b), 0xD8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), packed);
  }
  f32_to_bf16_scalar(src + i, dst + i, n - i);
}

__attribute__((target("avx512f,avx512bw"))) void f32_to_bf16_avx512(const uint32_t* src,
                                                                   uint16_t* dst, size_t n) {
  const __m512i bias = _mm512_set1_epi32(0x7FFF), one = _mm512_set1_epi32(1);
  const __m512i absmask = _mm512_set1_epi32(0x7FFFFFFF), inf = _mm512_set1_epi32(0x7F800000);
  const __m512i qnan = _mm512_set1_epi32(0x7FC0);
  size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    _mm_prefetch(reinterpret_cast<const char*>(src + i) + kPrefetch, _MM_HINT_T0);
    __m512i u = _mm512_loadu_si512(src + i);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), one);
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(bias, lsb)), 16);
    __mmask16 nan = _mm512_cmpgt_epi32_mask(_mm512_and_si512(u, absmask), inf);
    r = _mm512_mask_blend_epi32(nan, r, qnan);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), _mm512_cvtepi32_epi16(r));
  }
  f32_to_bf16_scalar(src + i, dst + i, n - i);
}
#endif

void f32_to_bf16_any(const uint32_t* src, uint16_t* dst, size_t n) {
#ifdef SPECCTL_X86
  if (g_avx512) return f32_to_bf16_avx512(src, dst, n);
  if (g_avx2) return f32_to_bf16_avx2(src, dst, n);
#endif
  f32_to_bf16_scalar(src, dst, n);
}

void convert(const void* src, int in_dt, uint8_t* dst, int out_dt, size_t n) {
  if (in_dt == out_dt) {
    std::memcpy(dst, src, n * (out_dt == kBf16 ? 2 : 4));
  } else if (out_dt == kBf16) {
    f32_to_bf16_any(static_cast<const uint32_t*>(src), reinterpret_cast<uint16_t*>(dst), n);
  } else {  // bf16 -> fp32 is exact: the bf16 bits become the upper half
    const uint16_t* s = static_cast<const uint16_t*>(src);
    uint32_t* d = reinterpret_cast<uint32_t*>(dst);
    for (size_t i = 0; i < n; i++) d[i] = static_cast<uint32_t>(s[i]) << 16;
  }
}

// ------------------------------------------------------------------ sections

struct Source {
  const uint8_t* ptr;  // element (row 0, col 0)
  int64_t row_bytes;   // byte stride between rows
};

struct Part {  // rows [r0, r1) of one hidden-state section
  uint32_t crc;
  uint64_t nbytes;
};

#ifdef SPECCTL_X86
// Non-temporal copy: for records far larger than the cache, skips the destination's
// read-for-ownership (a third of the memory traffic of a plain store).
__attribute__((target("avx512f"))) void stream_copy_avx512(uint8_t* dst, const uint8_t* src,
                                                           size_t n) {
  size_t head = (64 - (reinterpret_cast<uintptr_t>(dst) & 63)) & 63;
  if (head > n) head = n;
  std::memcpy(dst, src, head);
  size_t i = head;
  for (; i + 64 <= n; i += 64)
    _mm512_stream_si512(reinterpret_cast<__m512i*>(dst + i), _mm512_loadu_si512(src + i));
  std::memcpy(dst + i, src + i, n - i);
}

__attribute__((target("avx2"))) void stream_copy_avx2(uint8_t* dst, const uint8_t* src, size_t n) {
  size_t head = (32 - (reinterpret_cast<uintptr_t>(dst) & 31)) & 31;
  if (head > n) head = n;
  std::memcpy(dst, src, head);
  size_t i = head;
  for (; i + 32 <= n; i += 32)
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i),
                        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i)));
  std::memcpy(dst + i, src + i, n - i);
}
#endif

void stream_copy(uint8_t* dst, const uint8_t* src, size_t n) {
#ifdef SPECCTL_X86
  if (g_avx512) return stream_copy_avx512(dst, src, n);
  if (g_avx2) return stream_copy_avx2(dst, src, n);
#endif
  std::memcpy(dst, src, n);
}

// The output of a row range is contiguous and is CRCed in 4 KiB blocks right after they
// are written, while they are in L1. Small records are converted in place; large ones go
// through a block buffer that is then copied out with non-temporal stores.
struct Emitter {
  Emitter(uint8_t* d, uint32_t c, bool s) : dst(d), crc(c), stream(s) {}
  uint8_t* dst;  // where the next block goes
  uint32_t crc;
  bool stream;
  size_t fill = 0;
  alignas(64) uint8_t block[kBlockBytes];

  void put(const uint8_t* src, int in_dt, int out_dt, uint64_t n) {
    const size_t osz = out_dt == kBf16 ? 2 : 4, isz = in_dt == kBf16 ? 2 : 4;
    while (n) {
      uint64_t m = (kBlockBytes - fill) / osz;
      if (m > n) m = n;
      convert(src, in_dt, (stream ? block : dst) + fill, out_dt, m);
      fill += m * osz;
      src += m * isz;
      n -= m;
      if (fill == kBlockBytes) flush();
    }
  }
  void flush() {
    crc = crc_raw(crc, stream ? block : dst, fill);
    if (stream) stream_copy(dst, block, fill);
    dst += fill;
    fill = 0;
  }
};

// Gathers rows [r0, r1) of k sources into `out` (one output row = k segments of H) and
// returns the raw CRC (from `init`) of the bytes written.
uint32_t gather_rows(const Source* src, int k, int in_dt, int out_dt, uint64_t H, uint64_t r0,
                     uint64_t r1, uint8_t* out, uint32_t init, bool stream) {
  Emitter e{out + r0 * H * (out_dt == kBf16 ? 2 : 4) * k, init, stream};
  for (uint64_t r = r0; r < r1; r++)
    for (int j = 0; j < k; j++) e.put(src[j].ptr + r * src[j].row_bytes, in_dt, out_dt, H);
  e.flush();
#ifdef SPECCTL_X86
  if (stream) _mm_sfence();  // order the non-temporal stores before the caller's reads
#endif
  return e.crc;
}

// raw CRC parts of consecutive ranges -> finished CRC32C of the whole range.
uint32_t join_parts(const std::vector<Part>& parts) {
  uint32_t s = parts[0].crc;  // part 0 started from ~0
  for (size_t i = 1; i < parts.size(); i++) s = crc_shift(s, parts[i].nbytes) ^ parts[i].crc;
  return ~s;
}

int pick_threads(int requested, uint64_t nbytes) {
  if (requested > 0) return requested < 64 ? requested : 64;
  unsigned hw = g_cores;
  uint64_t by_size = nbytes / kBytesPerThread;
  uint64_t n = by_size < 1 ? 1 : by_size;
  if (hw && n > hw) n = hw;
  return static_cast<int>(n > 16 ? 16 : n);
}

// Runs fn(t) for t in [0, n) on n-1 extra threads plus the caller.
template <class F>
void parallel(int n, F fn) {
  std::vector<std::thread> pool;
  for (int t = 1; t < n; t++) pool.emplace_back(fn, t);
  fn(0);
  for (auto& th : pool) th.join();
}

}  // namespace

// ------------------------------------------------------------------ C ABI

API int specctl_pack_abi_version(void) { return 2; }  // 2: loss_mask normalised here

API int specctl_pack_cpu_features(void) {
  ensure_init();
  return (g_hw_crc ? 1 : 0) | (g_avx2 ? 2 : 0) | (g_avx512 ? 4 : 0) | (g_vpclmul ? 8 : 0);
}

API uint32_t specctl_crc32c(uint32_t crc, const void* data, uint64_t nbytes) {
  ensure_init();
  return ~crc_raw(~crc, static_cast<const uint8_t*>(data), nbytes);
}

API uint32_t specctl_crc32c_combine(uint32_t crc1, uint32_t crc2, uint64_t len2) {
  ensure_init();
  return crc_shift(crc1, len2) ^ crc2;
}

// CRC32C of n ranges of `buf` (for the reader's check 8), threads split each range.
API int specctl_crc32c_ranges(const uint8_t* buf, const uint64_t* offsets, const uint64_t* sizes,
                              uint32_t n, uint32_t* crcs_out, int num_threads) {
  ensure_init();
  if (!buf || !offsets || !sizes || !crcs_out) return -1;
  for (uint32_t i = 0; i < n; i++) {
    const uint8_t* p = buf + offsets[i];
    uint64_t len = sizes[i];
    int nt = pick_threads(num_threads, len);
    std::vector<Part> parts(nt);
    parallel(nt, [&](int t) {
      uint64_t a = len * t / nt, b = len * (t + 1) / nt;
      parts[t] = {crc_raw(t == 0 ? ~0u : 0u, p + a, b - a), b - a};
    });
    crcs_out[i] = join_parts(parts);
  }
  return 0;
}

// Packs the four sections of a record into `out` (header bytes [0, 128) untouched) and
// zero-fills the padding up to total_nbytes. See csrc/README.md for the contract.
API int specctl_pack_sections(uint8_t* out, uint64_t total_nbytes, const uint64_t* offsets,
                              uint32_t T, uint32_t H, uint32_t num_aux, int out_dtype,
                              const int32_t* input_ids, const uint8_t* loss_mask,
                              const void* const* aux_ptrs, const int64_t* aux_row_strides,
                              int aux_dtype, const void* last_ptr, int64_t last_row_stride,
                              int last_dtype, uint32_t* crcs_out, int num_threads) {
  ensure_init();
  auto dt_ok = [](int d) { return d == kBf16 || d == kFp32; };
  if (!out || !offsets || !input_ids || !loss_mask || !crcs_out || T == 0 || H == 0 ||
      !dt_ok(out_dtype) || (num_aux && (!aux_ptrs || !aux_row_strides || !dt_ok(aux_dtype))) ||
      (last_ptr && !dt_ok(last_dtype)))
    return -1;
  const uint64_t osz = out_dtype == kBf16 ? 2 : 4;
  const uint64_t sizes[4] = {4ull * T, T, num_aux ? uint64_t(T) * num_aux * H * osz : 0,
                             last_ptr ? uint64_t(T) * H * osz : 0};
  // 1. zero the padding: between sections and after the last one.
  uint64_t end = 128;
  for (int i = 0; i < 4; i++) {
    if (!sizes[i]) continue;
    if (offsets[i] < end || offsets[i] + sizes[i] > total_nbytes) return -2;
    std::memset(out + end, 0, offsets[i] - end);
    end = offsets[i] + sizes[i];
  }
  std::memset(out + end, 0, total_nbytes - end);
  // 2. the small sections on the calling thread.
  std::memcpy(out + offsets[0], input_ids, sizes[0]);
  for (uint32_t i = 0; i < T; i++) out[offsets[1] + i] = loss_mask[i] != 0;  // any nonzero -> 1
  crcs_out[0] = ~crc_raw(~0u, out + offsets[0], sizes[0]);
  crcs_out[1] = ~crc_raw(~0u, out + offsets[1], sizes[1]);
  crcs_out[2] = crcs_out[3] = 0;
  // 3. hidden-state sections: rows split over threads, each thread CRCs what it wrote.
  const int in_sz[3] = {0, 2, 4};
  std::vector<Source> aux(num_aux);
  for (uint32_t j = 0; j < num_aux; j++)
    aux[j] = {static_cast<const uint8_t*>(aux_ptrs[j]), aux_row_strides[j] * in_sz[aux_dtype]};
  Source last = {static_cast<const uint8_t*>(last_ptr),
                 last_ptr ? last_row_stride * in_sz[last_dtype] : 0};
  const bool stream = sizes[2] + sizes[3] >= g_stream_min;
  int nt = pick_threads(num_threads, sizes[2] + sizes[3]);
  if (static_cast<uint64_t>(nt) > T) nt = static_cast<int>(T);
  std::vector<Part> aux_parts(nt), last_parts(nt);
  parallel(nt, [&](int t) {
    uint64_t r0 = uint64_t(T) * t / nt, r1 = uint64_t(T) * (t + 1) / nt;
    uint32_t init = t == 0 ? ~0u : 0u;
    if (num_aux)
      aux_parts[t] = {gather_rows(aux.data(), num_aux, aux_dtype, out_dtype, H, r0, r1,
                                  out + offsets[2], init, stream),
                      (r1 - r0) * num_aux * H * osz};
    if (last_ptr)
      last_parts[t] = {
          gather_rows(&last, 1, last_dtype, out_dtype, H, r0, r1, out + offsets[3], init, stream),
          (r1 - r0) * H * osz};
  });
  if (num_aux) crcs_out[2] = join_parts(aux_parts);
  if (last_ptr) crcs_out[3] = join_parts(last_parts);
  return 0;
}
