/*
 * internal.h - the core's private object layouts and helpers.
 *
 * The public handles of moe.h are defined here; only core/ sees them.
 * Backends see buffers only as native handles (backend.h), and reach the
 * core objects through the few accessors declared at the end of backend.h.
 */
#ifndef MOE_CORE_INTERNAL_H
#define MOE_CORE_INTERNAL_H

#include "backend.h"

#include <pthread.h>
#include <stdbool.h>

#define MOE_DEVICE_NAME_SIZE 256
#define MOE_ERROR_MESSAGE_SIZE 512
#define MOE_OPTION_VALUE_SIZE 32
#define MOE_TUNING_MAX_SETTINGS 4 /* name=value pairs of one tuning entry */
#define MOE_TUNING_TEXT_SIZE 128  /* an entry's "name=value,..." text */

struct moe_context {
  const moe_backend_ops *ops;
  void *state;
  /* Held while a call queues work on the context (the layer forward and
   * reserve, the stages): backends keep per-context state that two threads
   * must not touch at once (OpenCL kernel arguments, a layer's workspace).
   * See "Thread safety" in include/moe.h. */
  pthread_mutex_t lock;
  char device_name[MOE_DEVICE_NAME_SIZE];
  char last_error[MOE_ERROR_MESSAGE_SIZE];
  /* The options as last set (moe_context_get_option); the backend keeps
   * the parsed values. */
  char option_values[MOE_OPTION_COUNT][MOE_OPTION_VALUE_SIZE];
  /* $MOE_TUNING_DIR as it was when the context was created ("" if unset
   * or too long): the deployment's tuning cache (core/tuning.c). */
  char tuning_dir[1024];
};

struct moe_buffer {
  moe_context *ctx;
  void *handle; /* the backend's native handle */
  size_t bytes;
  bool owned; /* false for wrapped caller memory */
};

/* One point of a layer's tuning table (core/tuning.c): from min_tokens
 * tokens up to the next point, forwards run with these options. */
typedef struct moe_tuning_entry {
  int64_t min_tokens;
  int count;
  int ids[MOE_TUNING_MAX_SETTINGS];
  char values[MOE_TUNING_MAX_SETTINGS][MOE_OPTION_VALUE_SIZE];
  char text[MOE_TUNING_TEXT_SIZE]; /* as given: "name=value,name=value" */
} moe_tuning_entry;

struct moe_layer {
  moe_context *ctx;
  moe_config cfg; /* validated; num_local_experts resolved, num_groups >= 1 */
  void *impl;
  int64_t reserved_tokens;
  bool chunked; /* moe_layer_set_chunking: T above the reservation runs in chunks */
  /* The tuning table, ascending min_tokens, sized when tuned or loaded
   * (the forward only reads it); guarded by the context's lock. */
  moe_tuning_entry *tuning;
  int tuning_count;
  bool tuning_cache_tried; /* reserve looked in $MOE_TUNING_DIR once */
};

/* Fills ctx's option values with the defaults (core/options.c). */
void moe_options_init(moe_context *ctx);

/* Options by id, for the core's own callers (core/options.c):
 *   moe_option_find: the id of a name, or -1 after setting the error.
 *   moe_option_check: INVALID_ARGUMENT unless value is one of the
 *     option's (and fits MOE_OPTION_VALUE_SIZE).
 *   moe_option_set_locked: moe_context_set_option's body, with ctx's lock
 *     held by the caller. */
int moe_option_find(const char *name);
moe_status moe_option_check(int id, const char *value);
moe_status moe_option_set_locked(moe_context *ctx, int id, const char *value);

/* Tuning tables (core/tuning.c), all with ctx's lock held:
 *   moe_tuning_lookup: the entry for T tokens (the last point <= T, else
 *     the first), NULL without a table.
 *   moe_tuning_apply_locked: sets an entry's options, saving the previous
 *     values in saved; on failure restores what it set.
 *   moe_tuning_restore_locked: puts the saved values back.
 * No allocation, no host wait. */
const moe_tuning_entry *moe_tuning_lookup(const moe_layer *layer, int64_t num_tokens);
moe_status moe_tuning_apply_locked(moe_context *ctx, const moe_tuning_entry *entry,
                                   char saved[][MOE_OPTION_VALUE_SIZE]);
void moe_tuning_restore_locked(moe_context *ctx, const moe_tuning_entry *entry,
                               char saved[][MOE_OPTION_VALUE_SIZE]);
/* Loads $MOE_TUNING_DIR's cache file of the layer, once per layer, when
 * the layer has no table; every failure leaves the layer as it was.
 * Called by moe_layer_reserve without the lock. */
void moe_tuning_cache_load(moe_layer *layer);
/* moe_layer_forward with an entry forced (NULL: the table's), for the
 * tuner (core/layer.c). */
moe_status moe_layer_forward_entry(moe_layer *layer, int64_t num_tokens, const moe_buffer *x,
                                   const moe_buffer *logits, moe_buffer *out,
                                   const moe_tuning_entry *force);

/* Routes later moe_set_error() calls of this thread to ctx (NULL: to the
 * thread's own message). Every public entry point calls it first. */
void moe_error_scope(moe_context *ctx);

/* size = a * b (* c), false on overflow of size_t. */
bool moe_mul_size(size_t *size, size_t a, size_t b);
bool moe_mul_size3(size_t *size, size_t a, size_t b, size_t c);

/* Checks that buf is non-NULL, belongs to ctx and holds at least `bytes`;
 * `what` names the argument in the message. */
moe_status moe_check_buffer(const moe_context *ctx, const moe_buffer *buf, size_t bytes,
                            const char *what);
/* As moe_check_buffer, for an optional buffer (NULL passes). */
moe_status moe_check_optional_buffer(const moe_context *ctx, const moe_buffer *buf, size_t bytes,
                                     const char *what);

/* The range checks every entry point shares, so that one condition gets
 * one code everywhere (README.md, "Errors and guarantees"): `what` names
 * the argument in the message.
 *   moe_check_row_length: H, I, n, k in [1, 2^30]: <= 0 INVALID_ARGUMENT,
 *     above 2^30 UNSUPPORTED (kernels index rows and 2I with int32).
 *   moe_check_expert_count: E or EL in [1, MOE_MAX_EXPERTS]: <= 0
 *     INVALID_ARGUMENT, above UNSUPPORTED.
 *   moe_check_top_k: [1, MOE_MAX_TOP_K]: <= 0 INVALID_ARGUMENT, above
 *     UNSUPPORTED.
 *   moe_check_slots: num_tokens >= 0 (else INVALID_ARGUMENT) and
 *     num_tokens * top_k within int32 slot ids (else UNSUPPORTED); top_k
 *     must already be checked. */
moe_status moe_check_row_length(int64_t value, const char *what);
moe_status moe_check_expert_count(int64_t value, const char *what);
moe_status moe_check_top_k(int64_t top_k);
moe_status moe_check_slots(int64_t num_tokens, int64_t top_k, const char *what);

/* Validates cfg; on success writes the resolved copy (num_local_experts and
 * num_groups filled in) to *resolved when it is not NULL. */
moe_status moe_config_resolve(const moe_config *cfg, moe_config *resolved);

/* Validates the routing subset of a resolved config. */
moe_status moe_config_check_routing(const moe_config *cfg);

/* Validates align's scalar arguments and computes the capacities. */
moe_status moe_align_check(int64_t num_tokens, int32_t top_k, int32_t num_local_experts,
                           int32_t block_m, int64_t *sorted_capacity, int64_t *block_capacity);

#endif /* MOE_CORE_INTERNAL_H */
