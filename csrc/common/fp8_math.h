// Per-element math of fp8_lookup (docs/ngram.md#fp8-tables): the e4m3 decode and the UE8M0 block
// scale, shared by the CPU and CUDA kernels so both compute the same bits.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/floating_point_utils.h>

#include <cstdint>

namespace retrieval_attention {

constexpr uint32_t kE4m3Rebias = 127 - 7;     // float32's exponent bias less e4m3's
constexpr uint32_t kE4m3FirstNormal = 0x08u;  // the smallest magnitude byte with exponent field 1
constexpr uint32_t kE4m3NanMagnitude = 0x7Fu;
constexpr float kE4m3SmallestNormal = 1.0f / 64.0f;  // 2^-6
constexpr int kUe8m0Bias = 127;                      // a UE8M0 byte e stands for 2^(e - 127)
constexpr uint32_t kUe8m0Nan = 0xFF;
constexpr uint32_t kFloat32QuietNan = 0x7FC00000u;
constexpr uint32_t kFloat32SmallestE8m0 = 0x00400000u;  // 2^-127, a float32 subnormal

// The float32 value of an e4m3fn byte (1 sign, 4 exponent bits of bias 7, 3 mantissa bits; no
// infinities, and S.1111.111 is NaN). Every e4m3 value is exact in float32.
C10_HOST_DEVICE inline float decode_e4m3(uint8_t byte) {
  const uint32_t sign = static_cast<uint32_t>(byte & 0x80u) << 24;
  const uint32_t magnitude = byte & 0x7Fu;
  // Exponent and mantissa moved into float32's fields, the exponent rebiased from 7 to 127.
  const uint32_t normal = (magnitude << 20) + (kE4m3Rebias << 23);
  // Exponent field 0: 2^-6 * (1 + m / 8) - 2^-6 = m * 2^-9, exact.
  const uint32_t subnormal = c10::detail::fp32_to_bits(
      c10::detail::fp32_from_bits((magnitude << 20) + ((kE4m3Rebias + 1) << 23)) - kE4m3SmallestNormal);
  // Selects by masks on the bits, not by branches: the CPU loop over a block then vectorizes (a branch
  // would keep the float subtraction behind it).
  const uint32_t is_subnormal = 0u - static_cast<uint32_t>(magnitude < kE4m3FirstNormal);
  const uint32_t is_nan = 0u - static_cast<uint32_t>(magnitude == kE4m3NanMagnitude);
  uint32_t bits = (subnormal & is_subnormal) | (normal & ~is_subnormal);
  bits = (kFloat32QuietNan & is_nan) | (bits & ~is_nan);
  return c10::detail::fp32_from_bits(bits | sign);
}

// The power of two a UE8M0 byte stands for, 2^(e - 127), as float32: byte 0 is the subnormal
// 2^-127 and byte 255 is NaN.
C10_HOST_DEVICE inline float decode_ue8m0(uint8_t byte) {
  if (byte == kUe8m0Nan) {
    return c10::detail::fp32_from_bits(kFloat32QuietNan);
  }
  if (byte == 0) {
    return c10::detail::fp32_from_bits(kFloat32SmallestE8m0);
  }
  return c10::detail::fp32_from_bits(static_cast<uint32_t>(byte) << 23);
}

// One dequantized element in float32: the decoded value times its block's scale, one rounding
// (none unless the product leaves float32's normal range), as rows.float() * scale.float() does.
C10_HOST_DEVICE inline float dequantize_e4m3(uint8_t value, float scale) { return decode_e4m3(value) * scale; }

}  // namespace retrieval_attention
