/*
 * align.c - host align: the metadata contract of docs/DESIGN.md, computed by a
 * counting sort, so slots stay in ascending order within each expert's run.
 * This is the CPU backend's align and the layout every device align must
 * reproduce byte for byte.
 */
#include "internal.h"

/* The local expert of a slot, or -1 when the slot is skipped. */
static int32_t local_expert(int32_t id, const int32_t *expert_map, int32_t num_experts,
                            int32_t num_local_experts) {
  if (expert_map) {
    if (id < 0 || id >= num_experts) return -1;
    id = expert_map[id];
  }
  return (id >= 0 && id < num_local_experts) ? id : -1;
}

void moe_align_host(const moe_align_args *args) {
  const int32_t *ids = args->topk_ids;
  const int32_t *map = args->expert_map;
  int32_t *sorted = args->sorted_token_ids;
  int32_t *expert_ids = args->expert_ids;
  const int64_t num_slots = args->num_tokens * args->top_k;
  const int32_t EL = args->num_local_experts, BM = args->block_m;

  int64_t cursor[MOE_MAX_EXPERTS + 1] = {0};
  for (int64_t s = 0; s < num_slots; ++s) {
    int32_t e = local_expert(ids[s], map, args->num_experts, EL);
    if (e >= 0) cursor[e + 1]++;
  }
  /* cursor[e] becomes P_e, the start of expert e's padded run. */
  for (int32_t e = 0; e < EL; ++e)
    cursor[e + 1] = cursor[e] + (cursor[e + 1] + BM - 1) / BM * BM;
  const int64_t padded = cursor[EL];

  int64_t block = 0;
  for (int32_t e = 0; e < EL; ++e)
    for (int64_t b = cursor[e] / BM; b < cursor[e + 1] / BM; ++b)
      expert_ids[block++] = e;
  for (; block < args->block_capacity; ++block)
    expert_ids[block] = -1;

  for (int64_t i = 0; i < args->sorted_capacity; ++i)
    sorted[i] = (int32_t)num_slots;
  for (int64_t s = 0; s < num_slots; ++s) {
    int32_t e = local_expert(ids[s], map, args->num_experts, EL);
    if (e >= 0) sorted[cursor[e]++] = (int32_t)s;
  }
  *(int32_t *)args->num_tokens_post_padded = (int32_t)padded;
}
