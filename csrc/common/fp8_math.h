// Per-element math of fp8_lookup (docs/ngram.md#fp8-tables): the e4m3 decode and the UE8M0 block
// scale, shared by the CPU and CUDA kernels so both compute the same bits.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/floating_point_utils.h>

#include <cstdint>

namespace retrieval_attention {

constexpr int kE4m3ExponentBias = 7;
constexpr int kFloat32ExponentBias = 127;
constexpr int kUe8m0Bias = 127;  // a UE8M0 byte e stands for 2^(e - 127)
constexpr uint32_t kUe8m0Nan = 0xFF;
constexpr uint32_t kFloat32QuietNan = 0x7FC00000u;
constexpr uint32_t kFloat32SmallestE8m0 = 0x00400000u;  // 2^-127, a float32 subnormal
constexpr float kE4m3SubnormalStep = 1.0f / 512.0f;     // 2^-9: the mantissa step below 2^-6

// The float32 value of an e4m3fn byte (1 sign, 4 exponent bits of bias 7, 3 mantissa bits; no
// infinities, and S.1111.111 is NaN). Every e4m3 value is exact in float32.
C10_HOST_DEVICE inline float decode_e4m3(uint8_t byte) {
  const uint32_t sign = static_cast<uint32_t>(byte & 0x80u) << 24;
  const uint32_t exponent = (byte >> 3) & 0xFu;
  const uint32_t mantissa = byte & 0x7u;
  if (exponent == 0xFu && mantissa == 0x7u) {
    return c10::detail::fp32_from_bits(sign | kFloat32QuietNan);
  }
  if (exponent == 0) {  // subnormal (or zero): mantissa * 2^-9, exact
    const float magnitude = static_cast<float>(mantissa) * kE4m3SubnormalStep;
    return sign ? -magnitude : magnitude;
  }
  const uint32_t biased = exponent - kE4m3ExponentBias + kFloat32ExponentBias;
  return c10::detail::fp32_from_bits(sign | (biased << 23) | (mantissa << 20));
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
