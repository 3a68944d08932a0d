/*
 * tuning.c - per-layer tuning tables (include/moe.h, "Tuning"): token-count
 * points -> context options, applied by the forward (core/layer.c) under
 * the context's lock; the on-device tuner that measures them; the text
 * file format and the $MOE_TUNING_DIR cache. Backend-neutral: the options
 * are the table of core/options.c, set through moe_context_set_option's
 * path, so every backend's kernel choices can be tuned without a line of
 * backend code.
 */
#include "internal.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define TUNE_WARMUP 2
#define TUNE_REPS 5

/* ---- Entries: parse, look up, apply, restore ------------------------- */

/* Parses "name=value[,name=value...]" into entry (min_tokens untouched). */
static moe_status parse_entry(const char *text, moe_tuning_entry *entry) {
  const size_t len = strlen(text);
  if (len == 0 || len >= MOE_TUNING_TEXT_SIZE)
    return moe_set_error(MOE_ERROR_INVALID_ARGUMENT,
                         "option set \"%s\" must have 1 to %d characters", text,
                         MOE_TUNING_TEXT_SIZE - 1);
  memcpy(entry->text, text, len + 1);
  entry->count = 0;
  char buf[MOE_TUNING_TEXT_SIZE];
  memcpy(buf, text, len + 1);
  for (char *p = buf, *next; p; p = next) {
    next = strchr(p, ',');
    if (next) *next++ = '\0';
    char *eq = strchr(p, '=');
    if (!eq || eq == p || !eq[1])
      return moe_set_error(MOE_ERROR_INVALID_ARGUMENT,
                           "option set \"%s\": \"%s\" is not name=value", text, p);
    *eq = '\0';
    if (entry->count == MOE_TUNING_MAX_SETTINGS)
      return moe_set_error(MOE_ERROR_INVALID_ARGUMENT, "option set \"%s\" has more than %d options",
                           text, MOE_TUNING_MAX_SETTINGS);
    const int id = moe_option_find(p);
    if (id < 0) return MOE_ERROR_INVALID_ARGUMENT;
    for (int i = 0; i < entry->count; ++i)
      if (entry->ids[i] == id)
        return moe_set_error(MOE_ERROR_INVALID_ARGUMENT, "option set \"%s\" names %s twice", text,
                             p);
    moe_status st = moe_option_check(id, eq + 1);
    if (st != MOE_SUCCESS) return st;
    entry->ids[entry->count] = id;
    snprintf(entry->values[entry->count], MOE_OPTION_VALUE_SIZE, "%s", eq + 1);
    ++entry->count;
  }
  return MOE_SUCCESS;
}

const moe_tuning_entry *moe_tuning_lookup(const moe_layer *layer, int64_t num_tokens) {
  if (!layer->tuning_count) return NULL;
  int i = 0;
  while (i + 1 < layer->tuning_count && layer->tuning[i + 1].min_tokens <= num_tokens)
    ++i;
  return &layer->tuning[i];
}

void moe_tuning_restore_locked(moe_context *ctx, const moe_tuning_entry *entry,
                               char saved[][MOE_OPTION_VALUE_SIZE]) {
  /* The saved values were in force a moment ago: they are accepted. */
  for (int i = entry->count - 1; i >= 0; --i)
    (void)moe_option_set_locked(ctx, entry->ids[i], saved[i]);
}

moe_status moe_tuning_apply_locked(moe_context *ctx, const moe_tuning_entry *entry,
                                   char saved[][MOE_OPTION_VALUE_SIZE]) {
  for (int i = 0; i < entry->count; ++i) {
    memcpy(saved[i], ctx->option_values[entry->ids[i]], MOE_OPTION_VALUE_SIZE);
    moe_status st = moe_option_set_locked(ctx, entry->ids[i], entry->values[i]);
    if (st != MOE_SUCCESS) {
      const moe_tuning_entry done = {
          .count = i, .ids = {entry->ids[0], entry->ids[1], entry->ids[2], entry->ids[3]}};
      moe_tuning_restore_locked(ctx, &done, saved);
      return st;
    }
  }
  return MOE_SUCCESS;
}

/* Replaces the layer's table (takes ownership of table). */
static void install(moe_layer *layer, moe_tuning_entry *table, int count) {
  pthread_mutex_lock(&layer->ctx->lock);
  moe_tuning_entry *old = layer->tuning;
  layer->tuning = table;
  layer->tuning_count = count;
  pthread_mutex_unlock(&layer->ctx->lock);
  free(old);
}

/* ---- The key ----------------------------------------------------------- */

#define KEY_FIELDS 4
static const char *const key_names[KEY_FIELDS] = {"backend", "device", "version", "shape"};

typedef struct tuning_key {
  char field[KEY_FIELDS][MOE_DEVICE_NAME_SIZE];
} tuning_key;

static const char *activation_name(moe_activation a) {
  return a == MOE_ACTIVATION_GEGLU          ? "geglu"
         : a == MOE_ACTIVATION_SWIGLU_CLAMP ? "swiglu_clamp"
                                            : "swiglu";
}

/* The device name without the bracketed kernel path that some backends
 * put in it (" [avx512]"): options must not change the key. */
static void make_key(moe_layer *layer, tuning_key *key) {
  const moe_config *c = &layer->cfg;
  snprintf(key->field[0], sizeof key->field[0], "%s", layer->ctx->ops->name);
  pthread_mutex_lock(&layer->ctx->lock);
  snprintf(key->field[1], sizeof key->field[1], "%s", layer->ctx->device_name);
  pthread_mutex_unlock(&layer->ctx->lock);
  for (char *open; (open = strchr(key->field[1], '[')) != NULL;) {
    char *close = strchr(open, ']');
    if (!close) break;
    while (open > key->field[1] && open[-1] == ' ')
      --open;
    memmove(open, close + 1, strlen(close + 1) + 1);
  }
  snprintf(key->field[2], sizeof key->field[2], "%d.%d.%d", MOE_VERSION_MAJOR, MOE_VERSION_MINOR,
           MOE_VERSION_PATCH);
  snprintf(key->field[3], sizeof key->field[3],
           "H=%lld I=%lld E=%d EL=%d k=%d activation=%s layout=%s router_weight=%s "
           "batch_invariant=%d",
           (long long)c->hidden_size, (long long)c->intermediate_size, (int)c->num_experts,
           (int)c->num_local_experts, (int)c->top_k, activation_name(c->activation),
           c->weight_layout == MOE_WEIGHT_LAYOUT_IN_OUT ? "in_out" : "out_in",
           c->router_weight == MOE_ROUTER_WEIGHT_ON_INPUT ? "input" : "output",
           c->batch_invariant ? 1 : 0);
}

/* dir/moe-tuning-<key, one file-name-safe token>.txt, or false. */
static bool cache_path(const tuning_key *key, const char *dir, char *path, size_t size) {
  char name[4 * MOE_DEVICE_NAME_SIZE];
  size_t len = 0;
  for (int f = 0; f < KEY_FIELDS; ++f) {
    if (f && len + 1 < sizeof name) name[len++] = '_';
    for (const char *p = key->field[f]; *p && len + 1 < sizeof name; ++p) {
      const char ch = *p;
      const bool keep = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
                        (ch >= '0' && ch <= '9') || ch == '.' || ch == '-';
      if (keep)
        name[len++] = ch;
      else if (len && name[len - 1] != '_')
        name[len++] = '_';
    }
  }
  name[len] = '\0';
  const int n = snprintf(path, size, "%s/moe-tuning_%s.txt", dir, name);
  return n > 0 && (size_t)n < size;
}

/* ---- File format ------------------------------------------------------- */

static moe_status save(moe_layer *layer, const tuning_key *key, const char *path) {
  /* A copy of the table, taken under the lock. */
  moe_tuning_entry table[MOE_TUNING_MAX_POINTS];
  pthread_mutex_lock(&layer->ctx->lock);
  const int count = layer->tuning_count;
  if (count) memcpy(table, layer->tuning, (size_t)count * sizeof *table);
  pthread_mutex_unlock(&layer->ctx->lock);
  if (!count) return moe_set_error(MOE_ERROR_INVALID_ARGUMENT, "the layer has no tuning table");
  FILE *f = fopen(path, "w");
  if (!f)
    return moe_set_error(MOE_ERROR_INVALID_ARGUMENT, "cannot write %s: %s", path, strerror(errno));
  fprintf(f, "# moe tuning table (moe_layer_save_tuning); the next five lines are its key\n");
  fprintf(f, "moe-tuning 1\n");
  for (int i = 0; i < KEY_FIELDS; ++i)
    fprintf(f, "%s %s\n", key_names[i], key->field[i]);
  for (int i = 0; i < count; ++i)
    fprintf(f, "point %lld %s\n", (long long)table[i].min_tokens, table[i].text);
  const bool failed = ferror(f) != 0;
  if (fclose(f) != 0 || failed)
    return moe_set_error(MOE_ERROR_INVALID_ARGUMENT, "cannot write %s", path);
  return MOE_SUCCESS;
}

/* Reads path into a new table (*table, *count) after checking its key. */
static moe_status load(moe_layer *layer, const char *path, moe_tuning_entry **table, int *count) {
  tuning_key key;
  make_key(layer, &key);
  FILE *f = fopen(path, "r");
  if (!f)
    return moe_set_error(MOE_ERROR_INVALID_ARGUMENT, "cannot read %s: %s", path, strerror(errno));
  moe_tuning_entry *t = calloc(MOE_TUNING_MAX_POINTS, sizeof *t);
  if (!t) {
    fclose(f);
    return moe_set_error(MOE_ERROR_OUT_OF_MEMORY, "cannot allocate a tuning table");
  }
  moe_status st = MOE_SUCCESS;
  int n = 0, header = 0, lineno = 0;
  char line[1024];
  while (st == MOE_SUCCESS && fgets(line, sizeof line, f)) {
    ++lineno;
    size_t len = strlen(line);
    while (len && (line[len - 1] == '\n' || line[len - 1] == '\r'))
      line[--len] = '\0';
    if (!len || line[0] == '#') continue;
    if (header == 0) {
      if (strcmp(line, "moe-tuning 1") != 0)
        st = moe_set_error(MOE_ERROR_INVALID_ARGUMENT,
                           "%s:%d: \"%s\" is not a moe tuning table (want \"moe-tuning 1\")", path,
                           lineno, line);
      ++header;
    } else if (header <= KEY_FIELDS) {
      const char *name = key_names[header - 1];
      const size_t nl = strlen(name);
      if (strncmp(line, name, nl) != 0 || line[nl] != ' ')
        st = moe_set_error(MOE_ERROR_INVALID_ARGUMENT, "%s:%d: expected the \"%s\" line", path,
                           lineno, name);
      else if (strcmp(line + nl + 1, key.field[header - 1]) != 0)
        st = moe_set_error(MOE_ERROR_TUNING_MISMATCH,
                           "%s:%d: the table is for %s \"%s\", this layer has \"%s\"", path, lineno,
                           name, line + nl + 1, key.field[header - 1]);
      ++header;
    } else {
      long long tokens = 0;
      int used = 0;
      if (sscanf(line, "point %lld %n", &tokens, &used) != 1 || used == 0 || !line[used])
        st = moe_set_error(MOE_ERROR_INVALID_ARGUMENT,
                           "%s:%d: \"%s\" is not \"point <tokens> <options>\"", path, lineno, line);
      else if (tokens < 1 || (n && tokens <= t[n - 1].min_tokens))
        st = moe_set_error(MOE_ERROR_INVALID_ARGUMENT,
                           "%s:%d: point %lld: token counts must be >= 1 and ascending", path,
                           lineno, tokens);
      else if (n == MOE_TUNING_MAX_POINTS)
        st = moe_set_error(MOE_ERROR_INVALID_ARGUMENT, "%s:%d: more than %d points", path, lineno,
                           MOE_TUNING_MAX_POINTS);
      else {
        st = parse_entry(line + used, &t[n]);
        t[n].min_tokens = tokens;
        ++n;
      }
    }
  }
  fclose(f);
  if (st == MOE_SUCCESS && (header <= KEY_FIELDS || n == 0))
    st = moe_set_error(MOE_ERROR_INVALID_ARGUMENT, "%s: %s", path,
                       header <= KEY_FIELDS ? "the key is incomplete" : "no points");
  /* Every entry must be one this device accepts: set and put back. */
  pthread_mutex_lock(&layer->ctx->lock);
  for (int i = 0; st == MOE_SUCCESS && i < n; ++i) {
    char saved[MOE_TUNING_MAX_SETTINGS][MOE_OPTION_VALUE_SIZE];
    st = moe_tuning_apply_locked(layer->ctx, &t[i], saved);
    if (st == MOE_SUCCESS) moe_tuning_restore_locked(layer->ctx, &t[i], saved);
  }
  pthread_mutex_unlock(&layer->ctx->lock);
  if (st != MOE_SUCCESS) {
    free(t);
    return st;
  }
  *table = t;
  *count = n;
  return MOE_SUCCESS;
}

void moe_tuning_cache_load(moe_layer *layer) {
  pthread_mutex_lock(&layer->ctx->lock);
  const bool look = !layer->tuning_cache_tried && !layer->tuning_count;
  layer->tuning_cache_tried = true;
  pthread_mutex_unlock(&layer->ctx->lock);
  const char *dir = look ? layer->ctx->tuning_dir : NULL;
  if (!dir || !*dir) return;
  tuning_key key;
  make_key(layer, &key);
  char path[4096];
  if (!cache_path(&key, dir, path, sizeof path)) return;
  FILE *probe = fopen(path, "r");
  if (!probe) return;
  fclose(probe);
  /* A cache file that does not load (another version, a broken file)
   * is ignored: the layer runs its defaults. Keep the last error. */
  char message[MOE_ERROR_MESSAGE_SIZE];
  memcpy(message, layer->ctx->last_error, sizeof message);
  moe_tuning_entry *table = NULL;
  int count = 0;
  if (load(layer, path, &table, &count) == MOE_SUCCESS) install(layer, table, count);
  memcpy(layer->ctx->last_error, message, sizeof message);
}

moe_status moe_layer_save_tuning(moe_layer *layer, const char *path) {
  moe_error_scope(layer ? layer->ctx : NULL);
  if (!layer || !path)
    return moe_set_error(MOE_ERROR_NULL_POINTER, "%s is NULL", !layer ? "layer" : "path");
  tuning_key key;
  make_key(layer, &key);
  return save(layer, &key, path);
}

moe_status moe_layer_load_tuning(moe_layer *layer, const char *path) {
  moe_error_scope(layer ? layer->ctx : NULL);
  if (!layer || !path)
    return moe_set_error(MOE_ERROR_NULL_POINTER, "%s is NULL", !layer ? "layer" : "path");
  moe_tuning_entry *table = NULL;
  int count = 0;
  moe_status st = load(layer, path, &table, &count);
  if (st == MOE_SUCCESS) install(layer, table, count);
  return st;
}

int moe_layer_tuning_count(moe_layer *layer) {
  if (!layer) return 0;
  pthread_mutex_lock(&layer->ctx->lock);
  const int n = layer->tuning_count;
  pthread_mutex_unlock(&layer->ctx->lock);
  return n;
}

moe_status moe_layer_tuning_entry(moe_layer *layer, int index, int64_t *min_tokens, char *options,
                                  size_t size) {
  moe_error_scope(layer ? layer->ctx : NULL);
  if (!layer || !min_tokens || !options)
    return moe_set_error(MOE_ERROR_NULL_POINTER, "%s is NULL",
                         !layer        ? "layer"
                         : !min_tokens ? "min_tokens"
                                       : "options");
  moe_status st = MOE_SUCCESS;
  pthread_mutex_lock(&layer->ctx->lock);
  if (index < 0 || index >= layer->tuning_count)
    st = moe_set_error(MOE_ERROR_INVALID_ARGUMENT, "index = %d is not in [0, %d)", index,
                       layer->tuning_count);
  else if (strlen(layer->tuning[index].text) + 1 > size)
    st = moe_set_error(MOE_ERROR_BUFFER_TOO_SMALL, "the options need %zu bytes, %zu given",
                       strlen(layer->tuning[index].text) + 1, size);
  else {
    *min_tokens = layer->tuning[index].min_tokens;
    memcpy(options, layer->tuning[index].text, strlen(layer->tuning[index].text) + 1);
  }
  pthread_mutex_unlock(&layer->ctx->lock);
  return st;
}

void moe_layer_clear_tuning(moe_layer *layer) {
  if (layer) install(layer, NULL, 0);
}

/* ---- The tuner --------------------------------------------------------- */

static double now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec * 1e-6;
}

static int compare_double(const void *a, const void *b) {
  const double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

/* splitmix64, for the tuner's inputs. */
static uint64_t next_random(uint64_t *s) {
  uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

static float uniform(uint64_t *s) {
  return (float)((double)(next_random(s) >> 11) * 0x1.0p-53 * 2.0 - 1.0);
}

/* Random x and logits for T tokens, written into new buffers. */
static moe_status make_inputs(moe_layer *layer, int64_t T, moe_buffer **x, moe_buffer **logits,
                              moe_buffer **out) {
  const moe_config *c = &layer->cfg;
  const size_t nx = (size_t)T * (size_t)c->hidden_size, nl = (size_t)T * (size_t)c->num_experts;
  uint16_t *hx = malloc(nx * 2);
  float *hl = malloc(nl * sizeof *hl);
  moe_status st =
      hx && hl ? MOE_SUCCESS : moe_set_error(MOE_ERROR_OUT_OF_MEMORY, "cannot allocate inputs");
  uint64_t seed = 0x7475E5;
  for (size_t i = 0; st == MOE_SUCCESS && i < nx; ++i) {
    const float v = uniform(&seed) * 1.7f;
    uint32_t bits;
    memcpy(&bits, &v, 4);
    hx[i] = (uint16_t)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
  }
  for (size_t i = 0; st == MOE_SUCCESS && i < nl; ++i)
    hl[i] = uniform(&seed) * 3.0f;
  if (st == MOE_SUCCESS) st = moe_buffer_create(layer->ctx, nx * 2, x);
  if (st == MOE_SUCCESS) st = moe_buffer_create(layer->ctx, nl * sizeof *hl, logits);
  if (st == MOE_SUCCESS) st = moe_buffer_create(layer->ctx, nx * 2, out);
  if (st == MOE_SUCCESS) st = moe_buffer_write(*x, 0, hx, nx * 2);
  if (st == MOE_SUCCESS) st = moe_buffer_write(*logits, 0, hl, nl * sizeof *hl);
  free(hx);
  free(hl);
  return st;
}

/* The median of TUNE_REPS timed forwards after TUNE_WARMUP, in ms. */
static moe_status time_entry(moe_layer *layer, int64_t T, moe_buffer *x, moe_buffer *logits,
                             moe_buffer *out, const moe_tuning_entry *entry, double *median) {
  double t[TUNE_REPS];
  moe_status st = MOE_SUCCESS;
  for (int r = 0; st == MOE_SUCCESS && r < TUNE_WARMUP + TUNE_REPS; ++r) {
    st = moe_context_synchronize(layer->ctx);
    const double t0 = now_ms();
    if (st == MOE_SUCCESS) st = moe_layer_forward_entry(layer, T, x, logits, out, entry);
    if (st == MOE_SUCCESS) st = moe_context_synchronize(layer->ctx);
    if (r >= TUNE_WARMUP) t[r - TUNE_WARMUP] = now_ms() - t0;
  }
  if (st != MOE_SUCCESS) return st;
  qsort(t, TUNE_REPS, sizeof t[0], compare_double);
  *median = t[TUNE_REPS / 2];
  return MOE_SUCCESS;
}

moe_status moe_layer_tune(moe_layer *layer, const int64_t *token_counts, int n,
                          const char *const *candidates, int n_candidates, double *times_ms) {
  moe_error_scope(layer ? layer->ctx : NULL);
  if (!layer || !token_counts || !candidates)
    return moe_set_error(MOE_ERROR_NULL_POINTER, "%s is NULL",
                         !layer          ? "layer"
                         : !token_counts ? "token_counts"
                                         : "candidates");
  if (n < 1 || n > MOE_TUNING_MAX_POINTS)
    return moe_set_error(MOE_ERROR_INVALID_ARGUMENT, "n = %d is not in [1, %d]", n,
                         MOE_TUNING_MAX_POINTS);
  if (n_candidates < 1 || n_candidates > MOE_TUNING_MAX_CANDIDATES)
    return moe_set_error(MOE_ERROR_INVALID_ARGUMENT, "n_candidates = %d is not in [1, %d]",
                         n_candidates, MOE_TUNING_MAX_CANDIDATES);
  for (int i = 0; i < n; ++i)
    if (token_counts[i] < 1 || (i && token_counts[i] <= token_counts[i - 1]))
      return moe_set_error(MOE_ERROR_INVALID_ARGUMENT,
                           "token_counts[%d] = %lld: counts must be >= 1 and ascending", i,
                           (long long)token_counts[i]);
  for (int c = 0; c < n_candidates; ++c)
    if (!candidates[c]) return moe_set_error(MOE_ERROR_NULL_POINTER, "candidates[%d] is NULL", c);
  moe_tuning_entry *cand = calloc((size_t)n_candidates, sizeof *cand);
  moe_tuning_entry *table = calloc((size_t)n, sizeof *table);
  if (!cand || !table) {
    free(cand);
    free(table);
    return moe_set_error(MOE_ERROR_OUT_OF_MEMORY, "cannot allocate the tuning table");
  }
  moe_status st = MOE_SUCCESS;
  for (int c = 0; st == MOE_SUCCESS && c < n_candidates; ++c)
    st = parse_entry(candidates[c], &cand[c]);
  if (st == MOE_SUCCESS) st = moe_layer_reserve(layer, token_counts[n - 1]);
  moe_buffer *x = NULL, *logits = NULL, *out = NULL;
  if (st == MOE_SUCCESS) st = make_inputs(layer, token_counts[n - 1], &x, &logits, &out);
  for (int i = 0; st == MOE_SUCCESS && i < n; ++i) {
    int best = -1;
    double best_ms = 0;
    for (int c = 0; st == MOE_SUCCESS && c < n_candidates; ++c) {
      double ms = NAN;
      st = time_entry(layer, token_counts[i], x, logits, out, &cand[c], &ms);
      if (st == MOE_ERROR_UNSUPPORTED) { /* a candidate this device refuses */
        st = MOE_SUCCESS;
        ms = NAN;
      } else if (st == MOE_SUCCESS && (best < 0 || ms < best_ms)) {
        best = c;
        best_ms = ms;
      }
      if (times_ms) times_ms[(size_t)i * (size_t)n_candidates + (size_t)c] = ms;
    }
    if (st == MOE_SUCCESS && best < 0)
      st = moe_set_error(MOE_ERROR_UNSUPPORTED, "no candidate runs at %lld tokens",
                         (long long)token_counts[i]);
    if (st == MOE_SUCCESS) {
      table[i] = cand[best];
      table[i].min_tokens = token_counts[i];
    }
  }
  moe_buffer_destroy(x);
  moe_buffer_destroy(logits);
  moe_buffer_destroy(out);
  free(cand);
  if (st != MOE_SUCCESS) {
    free(table);
    return st;
  }
  install(layer, table, n);
  /* The deployment's cache, best effort. */
  const char *dir = layer->ctx->tuning_dir;
  if (*dir) {
    tuning_key key;
    make_key(layer, &key);
    char path[4096];
    char message[MOE_ERROR_MESSAGE_SIZE];
    memcpy(message, layer->ctx->last_error, sizeof message);
    if (cache_path(&key, dir, path, sizeof path)) (void)save(layer, &key, path);
    memcpy(layer->ctx->last_error, message, sizeof message);
  }
  return MOE_SUCCESS;
}
