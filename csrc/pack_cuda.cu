// specctl record packer for device tensors: one kernel launch gathers the k aux layers
// and the last hidden state ([T, H] each, fp32 or bf16, rows may be strided) into the
// aux_hidden and last_hidden sections of one staging buffer (device memory, or pinned
// host memory reachable through UVA), casting to the record dtype on the way.
//
// The bytes written are exactly those of csrc/pack.cpp and specctl.pack's torch path:
// fp32 -> bf16 is round-to-nearest-even on the bit pattern with NaN -> 0x7FC0 (not
// __float2bfloat16_rn, which writes 0x7FFF for NaN). input_ids, loss_mask, padding,
// the CRCs and the header are done on the host after the copy (see csrc/README.md):
// they are a few bytes per token, and the CRC must run over the host bytes anyway.

#include <cuda_runtime.h>

#include <cstdint>

#define API extern "C" __attribute__((visibility("default")))

namespace {

constexpr int kBf16 = 1, kFp32 = 2;
constexpr int kMaxAux = 8;

struct Args {
  const void* aux[kMaxAux];  // k sources, element (row 0, col 0)
  int64_t aux_stride[kMaxAux];  // elements between rows
  const void* last;
  int64_t last_stride;
  uint8_t* aux_out;   // section 2, [T, k*H]
  uint8_t* last_out;  // section 3, [T, H]
  uint64_t T, H, k;
  int in_dtype, out_dtype;
};

__device__ __forceinline__ uint32_t load_bits(const void* base, int64_t elem, int dtype) {
  // Returns the fp32 bit pattern of element `elem` (bf16 widened exactly).
  if (dtype == kFp32) return static_cast<const uint32_t*>(base)[elem];
  return static_cast<uint32_t>(static_cast<const uint16_t*>(base)[elem]) << 16;
}

__device__ __forceinline__ void store(uint8_t* out, uint64_t i, uint32_t bits, int dtype) {
  if (dtype == kFp32) {
    reinterpret_cast<uint32_t*>(out)[i] = bits;
    return;
  }
  uint16_t h;
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) {
    h = 0x7FC0;
  } else {
    h = static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
  }
  reinterpret_cast<uint16_t*>(out)[i] = h;
}

// One block per (row, source) pair, grid-stride; the block's threads walk the H columns,
// so reads and writes are coalesced and no per-element division is needed.
__global__ void gather_cast(Args a) {
  const uint64_t nsrc = a.k + (a.last ? 1 : 0);
  for (uint64_t b = blockIdx.x; b < a.T * nsrc; b += gridDim.x) {
    const uint64_t r = b / nsrc, j = b % nsrc;
    const bool aux = j < a.k;
    const void* src = aux ? a.aux[j] : a.last;
    const int64_t row = int64_t(r) * (aux ? a.aux_stride[j] : a.last_stride);
    uint8_t* out = aux ? a.aux_out : a.last_out;
    const uint64_t first = aux ? (r * a.k + j) * a.H : r * a.H;  // output element index
    for (uint64_t c = threadIdx.x; c < a.H; c += blockDim.x)
      store(out, first + c, load_bits(src, row + int64_t(c), a.in_dtype), a.out_dtype);
  }
}

}  // namespace

API int specctl_cuda_abi_version(void) { return 1; }

// Enqueues the gather on `stream` (a cudaStream_t, 0 = default) and returns without
// waiting; returns a cudaError_t (0 = success) or -1 for bad arguments.
API int specctl_cuda_pack_hidden(uint8_t* aux_out, uint8_t* last_out, uint32_t T, uint32_t H,
                                 uint32_t num_aux, int out_dtype, const void* const* aux_ptrs,
                                 const int64_t* aux_row_strides, const void* last_ptr,
                                 int64_t last_row_stride, int in_dtype, void* stream) {
  if (T == 0 || H == 0 || num_aux > kMaxAux || (num_aux && !aux_out) || (last_ptr && !last_out) ||
      (in_dtype != kBf16 && in_dtype != kFp32) || (out_dtype != kBf16 && out_dtype != kFp32))
    return -1;
  Args a = {};
  for (uint32_t j = 0; j < num_aux; j++) {
    a.aux[j] = aux_ptrs[j];
    a.aux_stride[j] = aux_row_strides[j];
  }
  a.last = last_ptr;
  a.last_stride = last_row_stride;
  a.aux_out = aux_out;
  a.last_out = last_out;
  a.T = T;
  a.H = H;
  a.k = num_aux;
  a.in_dtype = in_dtype;
  a.out_dtype = out_dtype;
  uint64_t blocks = uint64_t(T) * (num_aux + (last_ptr ? 1 : 0));
  if (blocks == 0) return 0;
  if (blocks > (1u << 20)) blocks = 1u << 20;
  gather_cast<<<static_cast<unsigned>(blocks), 256, 0, static_cast<cudaStream_t>(stream)>>>(a);
  return static_cast<int>(cudaGetLastError());
}
