/*
 * prelude.cl - the first part of the OpenCL program: bf16 storage helpers
 * shared by every kernel. bf16 is held as ushort (the upper half of an fp32);
 * all arithmetic is fp32.
 */

/* bf16 -> fp32 is exact: the bits move to the upper half. */
inline float moe_bf16_to_f32(ushort v) {
  return as_float((uint)v << 16);
}

inline float4 moe_bf16x4_to_f32(ushort4 v) {
  return as_float4(convert_uint4(v) << 16);
}

inline float8 moe_bf16x8_to_f32(ushort8 v) {
  return as_float8(convert_uint8(v) << 16);
}

/* fp32 -> bf16, round to nearest even; a NaN stays a (quiet) NaN. */
inline ushort moe_f32_to_bf16(float f) {
  uint u = as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (ushort)((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (ushort)(u >> 16);
}
