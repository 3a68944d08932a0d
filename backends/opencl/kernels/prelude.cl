/*
 * prelude.cl - vector forms of the bf16 helpers of backends/common/
 * bf16_logic.h (embedded before this file), for the kernels' 8- and
 * 16-byte loads. bf16 is held as ushort; all arithmetic is fp32.
 */

inline float4 moe_bf16x4_to_f32(ushort4 v) {
  return as_float4(convert_uint4(v) << 16);
}

inline float8 moe_bf16x8_to_f32(ushort8 v) {
  return as_float8(convert_uint8(v) << 16);
}
