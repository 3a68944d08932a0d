/*
 * activation_fallback.cl - the gated activations as scalar fp32 formulas
 * (the contract of moe_activation in include/moe.h).
 */
#define MOE_OCL_ACT_SWIGLU 0
#define MOE_OCL_ACT_GEGLU 1
#define MOE_OCL_ACT_SWIGLU_CLAMP 2

inline float moe_ocl_activate(int activation, float gate, float up, float alpha, float limit) {
  if (activation == MOE_OCL_ACT_GEGLU) {
    const float k0 = 0.7978845608028654f; /* sqrt(2 / pi) */
    return 0.5f * gate * (1.0f + tanh(k0 * (gate + 0.044715f * gate * gate * gate))) * up;
  }
  if (activation == MOE_OCL_ACT_SWIGLU_CLAMP) {
    float g = fmin(gate, limit);
    float u = fmin(fmax(up, -limit), limit);
    return g / (1.0f + exp(-alpha * g)) * (u + 1.0f);
  }
  return gate / (1.0f + exp(-gate)) * up;
}
