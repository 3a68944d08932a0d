/*
 * options.c - the table of context options (moe_context_set_option): every
 * name, its values and default, checked here once for every backend, so
 * that a misspelt name or value fails on any machine; then handed to the
 * backend that the option belongs to (moe_backend_ops.set_option), which
 * keeps the parsed value in its state. Kernel choices are never read from
 * the environment: a forward depends only on the layer, its options and
 * the device.
 */
#include "internal.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* One option: values is a '|'-separated list of names (the first is the
 * default) or NULL for an integer in [min, max]. The list must stay in the
 * order of the choice constants in backend.h. An integer option whose
 * default is "auto" also takes "auto", parsed as -1: the backend's own
 * value for the device (its tuning data). */
typedef struct option_spec {
  const char *name;
  moe_backend backend;
  const char *values;
  const char *default_value;
  int64_t min, max;
} option_spec;

static const option_spec specs[MOE_OPTION_COUNT] = {
    [MOE_OPTION_CPU_KERNELS] = {"cpu.kernels", MOE_BACKEND_CPU,
                                "auto|portable|avx512|avx512bf16|amx", "auto", 0, 0},
    [MOE_OPTION_OPENCL_ROUTE] = {"opencl.route", MOE_BACKEND_OPENCL, "auto|serial|parallel", "auto",
                                 0, 0},
    [MOE_OPTION_OPENCL_SKINNY] = {"opencl.skinny", MOE_BACKEND_OPENCL,
                                  "auto|64x4x1u2|64x4x4|64x4x4u2|64x8x4|128x4x8", "auto", 0, 0},
    [MOE_OPTION_OPENCL_SKINNY_MAX_ROWS] = {"opencl.skinny_max_rows", MOE_BACKEND_OPENCL, NULL, "64",
                                           0, INT32_MAX},
    [MOE_OPTION_CUDA_PATH] = {"cuda.path", MOE_BACKEND_CUDA, "auto|decode|stream|wgmma|mma", "auto",
                              0, 0},
    [MOE_OPTION_CUDA_TILE] = {"cuda.tile", MOE_BACKEND_CUDA,
                              "auto|gemv|16x32|16x64|16x64k64|16x128|16x32k256|32x64|32x128|"
                              "64x128|128x128|128x128k64|128x256",
                              "auto", 0, 0},
    [MOE_OPTION_CUDA_GEMV_MAX_ROWS] = {"cuda.gemv_max_rows", MOE_BACKEND_CUDA, NULL, "1", 0,
                                       INT32_MAX},
    [MOE_OPTION_CUDA_ROUTING] = {"cuda.routing", MOE_BACKEND_CUDA, "auto|warp|reference|rank",
                                 "auto", 0, 0},
    [MOE_OPTION_CUDA_DECODE_PDL] = {"cuda.decode_pdl", MOE_BACKEND_CUDA, "on|off", "on", 0, 0},
    [MOE_OPTION_CUDA_DECODE_PERSISTENT] = {"cuda.decode_persistent", MOE_BACKEND_CUDA, "on|off",
                                           "on", 0, 0},
    [MOE_OPTION_CUDA_WGMMA_BN] = {"cuda.wgmma_bn", MOE_BACKEND_CUDA, "auto|128|256", "auto", 0, 0},
    [MOE_OPTION_CUDA_PDL] = {"cuda.pdl", MOE_BACKEND_CUDA, "off|on", "off", 0, 0},
    [MOE_OPTION_CUDA_STREAM_OVERLAP] = {"cuda.stream_overlap", MOE_BACKEND_CUDA, "on|off", "on", 0,
                                        0},
    [MOE_OPTION_CUDA_STREAM_CTAS] = {"cuda.stream_ctas", MOE_BACKEND_CUDA, "1|2", "2", 0, 0},
    [MOE_OPTION_CUDA_STREAM_MAX_ROWS] = {"cuda.stream_max_rows", MOE_BACKEND_CUDA, NULL, "auto", 0,
                                         INT32_MAX},
    [MOE_OPTION_CUDA_WGMMA_MIN_ROWS] = {"cuda.wgmma_min_rows", MOE_BACKEND_CUDA, NULL, "auto", 1,
                                        INT32_MAX},
    [MOE_OPTION_CUDA_STREAM_BLOCK] = {"cuda.stream_block", MOE_BACKEND_CUDA, "auto|16|32|64|128",
                                      "auto", 0, 0},
    [MOE_OPTION_CUDA_STREAM_SCHEDULE] = {"cuda.stream_schedule", MOE_BACKEND_CUDA, "static|dynamic",
                                         "static", 0, 0},
    [MOE_OPTION_CUDA_STREAM_GROUP] = {"cuda.stream_group", MOE_BACKEND_CUDA, NULL, "auto", 1,
                                      INT32_MAX},
    [MOE_OPTION_CUDA_WGMMA_GATHER] = {"cuda.wgmma_gather", MOE_BACKEND_CUDA, "auto|off|on", "auto",
                                      0, 0},
    [MOE_OPTION_CUDA_STREAM_K] = {"cuda.stream_k", MOE_BACKEND_CUDA, "auto|128|256", "auto", 0, 0},
    [MOE_OPTION_CUDA_WGMMA_BM] = {"cuda.wgmma_bm", MOE_BACKEND_CUDA, "auto|128|64", "auto", 0, 0},
};

const char *moe_option_default(moe_option_id id) {
  return specs[id].default_value;
}

/* The index of value in a '|'-separated list, or -1. */
static int choice_index(const char *list, const char *value) {
  const size_t len = strlen(value);
  int index = 0;
  for (const char *p = list; *p; ++index) {
    const size_t n = strcspn(p, "|");
    if (n == len && strncmp(p, value, n) == 0) return index;
    p += n;
    if (*p == '|') ++p;
  }
  return -1;
}

/* Parses a value of spec: the choice's index, or the integer. */
static moe_status parse_value(const option_spec *spec, const char *value, int64_t *parsed) {
  if (spec->values) {
    const int index = choice_index(spec->values, value);
    if (index < 0)
      return moe_set_error(MOE_ERROR_INVALID_ARGUMENT, "option %s = \"%s\" is not one of %s",
                           spec->name, value, spec->values);
    *parsed = index;
    return MOE_SUCCESS;
  }
  if (strcmp(spec->default_value, "auto") == 0 && strcmp(value, "auto") == 0) {
    *parsed = -1;
    return MOE_SUCCESS;
  }
  /* Digits only, with an optional minus (strtoll alone takes blanks, +). */
  const int starts_well = (*value >= '0' && *value <= '9') || *value == '-';
  char *end = NULL;
  errno = 0;
  const long long v = strtoll(value, &end, 10);
  if (!starts_well || *end || errno == ERANGE || v < spec->min || v > spec->max)
    return moe_set_error(MOE_ERROR_INVALID_ARGUMENT,
                         "option %s = \"%s\" is not an integer in [%lld, %lld]%s", spec->name,
                         value, (long long)spec->min, (long long)spec->max,
                         strcmp(spec->default_value, "auto") == 0 ? " or auto" : "");
  *parsed = v;
  return MOE_SUCCESS;
}

/* The option of a name, or -1 after setting the error. */
static int find_option(const char *name) {
  for (int i = 0; i < MOE_OPTION_COUNT; ++i)
    if (strcmp(specs[i].name, name) == 0) return i;
  size_t len = 0;
  char known[1024] = "";
  for (int i = 0; i < MOE_OPTION_COUNT; ++i)
    len += (size_t)snprintf(known + len, len < sizeof known ? sizeof known - len : 0, "%s%s",
                            i ? ", " : "", specs[i].name);
  moe_set_error(MOE_ERROR_INVALID_ARGUMENT, "\"%s\" is not an option (options: %s)", name, known);
  return -1;
}

void moe_options_init(moe_context *ctx) {
  for (int i = 0; i < MOE_OPTION_COUNT; ++i)
    snprintf(ctx->option_values[i], sizeof ctx->option_values[i], "%s", specs[i].default_value);
}

int moe_option_find(const char *name) {
  return find_option(name);
}

moe_status moe_option_check(int id, const char *value) {
  int64_t parsed = 0;
  moe_status st = parse_value(&specs[id], value, &parsed);
  if (st == MOE_SUCCESS && strlen(value) >= MOE_OPTION_VALUE_SIZE)
    st = moe_set_error(MOE_ERROR_INVALID_ARGUMENT, "option %s = \"%s\" is too long", specs[id].name,
                       value);
  return st;
}

moe_status moe_option_set_locked(moe_context *ctx, int id, const char *value) {
  int64_t parsed = 0;
  moe_status st = parse_value(&specs[id], value, &parsed);
  if (st != MOE_SUCCESS) return st;
  /* Another backend's option is checked and kept (the getter reads it
   * back) and has no effect here: one list of options can serve every
   * backend. */
  if (specs[id].backend == ctx->ops->kind)
    st = ctx->ops->set_option
             ? ctx->ops->set_option(ctx->state, (moe_option_id)id, value, parsed, ctx->device_name,
                                    sizeof ctx->device_name)
             : moe_set_error(MOE_ERROR_INTERNAL, "backend %s takes no options", ctx->ops->name);
  if (st == MOE_SUCCESS)
    snprintf(ctx->option_values[id], sizeof ctx->option_values[id], "%s", value);
  return st;
}

/* The entry of moe_context_set_option and moe_context_get_option: the
 * arguments' NULL checks, then the id of the option called name. */
static moe_status option_entry(moe_context *ctx, const char *name, const void *value, int *id) {
  *id = -1;
  moe_error_scope(ctx);
  if (!ctx || !name || !value)
    return moe_set_error(MOE_ERROR_NULL_POINTER, "%s is NULL",
                         !ctx    ? "ctx"
                         : !name ? "name"
                                 : "value");
  *id = find_option(name);
  return *id < 0 ? MOE_ERROR_INVALID_ARGUMENT : MOE_SUCCESS;
}

moe_status moe_context_set_option(moe_context *ctx, const char *name, const char *value) {
  int id;
  MOE_TRY(option_entry(ctx, name, value, &id));
  MOE_TRY(moe_option_check(id, value));
  /* Under the lock: a forward on another thread sees the option before or
   * after, never half set. */
  pthread_mutex_lock(&ctx->lock);
  const moe_status st = moe_option_set_locked(ctx, id, value);
  pthread_mutex_unlock(&ctx->lock);
  return st;
}

moe_status moe_context_get_option(moe_context *ctx, const char *name, char *value, size_t size) {
  int id;
  MOE_TRY(option_entry(ctx, name, value, &id));
  pthread_mutex_lock(&ctx->lock);
  const size_t len = strlen(ctx->option_values[id]);
  moe_status st = MOE_SUCCESS;
  if (len + 1 > size)
    st = moe_set_error(MOE_ERROR_BUFFER_TOO_SMALL, "option %s's value needs %zu bytes, %zu given",
                       name, len + 1, size);
  else
    memcpy(value, ctx->option_values[id], len + 1);
  pthread_mutex_unlock(&ctx->lock);
  return st;
}
