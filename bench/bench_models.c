/*
 * bench_models.c - the table of named model shapes (sizes from each model's
 * published configuration) and the flops/bytes they imply.
 */
#include "bench_models.h"

#include <string.h>

/* A softmax top-k SwiGLU layer; models adjust the rest after this. */
static moe_config base_config(int64_t hidden, int64_t intermediate, int32_t experts, int32_t top_k,
                              int32_t renormalize) {
  moe_config cfg;
  moe_config_init(&cfg);
  cfg.hidden_size = hidden;
  cfg.intermediate_size = intermediate;
  cfg.num_experts = experts;
  cfg.top_k = top_k;
  cfg.renormalize = renormalize;
  return cfg;
}

static bench_model models[5];
static int models_ready;

static void init_models(void) {
  if (models_ready) return;
  models[0] = (bench_model){"mixtral-8x7b", base_config(4096, 14336, 8, 2, 1), false, false};
  models[1] = (bench_model){"qwen3-30b-a3b", base_config(2048, 768, 128, 8, 1), false, false};

  moe_config deepseek = base_config(7168, 2048, 256, 8, 1);
  deepseek.scoring = MOE_SCORING_SIGMOID;
  deepseek.num_groups = 8;
  deepseek.topk_groups = 4;
  deepseek.group_scoring = MOE_GROUP_SCORING_TOP2_SUM;
  deepseek.routed_scaling_factor = 2.5f;
  models[2] = (bench_model){"deepseek-v3", deepseek, false, true};

  models[3] = (bench_model){"ernie-4.5-21b-a3b", base_config(2560, 1536, 64, 6, 1), false, false};

  moe_config gpt_oss = base_config(2880, 2880, 32, 4, 1);
  gpt_oss.activation = MOE_ACTIVATION_SWIGLU_CLAMP;
  models[4] = (bench_model){"gpt-oss-20b", gpt_oss, true, false};
  models_ready = 1;
}

int bench_model_count(void) {
  return (int)(sizeof models / sizeof models[0]);
}

const bench_model *bench_model_at(int index) {
  init_models();
  return index >= 0 && index < bench_model_count() ? &models[index] : NULL;
}

const bench_model *bench_model_find(const char *name) {
  for (int i = 0; i < bench_model_count(); ++i)
    if (strcmp(bench_model_at(i)->name, name) == 0) return bench_model_at(i);
  return NULL;
}

bench_model bench_model_custom(int64_t hidden, int64_t intermediate, int32_t experts,
                               int32_t top_k) {
  return (bench_model){"custom", base_config(hidden, intermediate, experts, top_k, 1), false,
                       false};
}

double bench_model_expert_bytes(const moe_config *cfg) {
  return 3.0 * (double)cfg->hidden_size * (double)cfg->intermediate_size * 2.0;
}

double bench_model_flops(const moe_config *cfg, int64_t num_tokens) {
  return 2.0 * (double)num_tokens * cfg->top_k * 3.0 * (double)cfg->hidden_size *
         (double)cfg->intermediate_size;
}
