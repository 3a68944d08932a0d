/*
 * test_tune.c - per-layer tuning tables (moe_layer_tune, save/load, the
 * forward's use of them), on every backend: a tuned layer's description
 * and output are bitwise those of forcing the chosen options by hand; the
 * forwards stay within the float64 reference's bound; a table survives a
 * save and load; a table of another shape or device is refused with
 * TUNING_MISMATCH. Argument errors are rows of test_errors.c.
 */
#include "harness.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

TestSuite(tune, .fini = th_suite_fini);

#define LAYER_BOUND 1e-2

/* Two option sets every device of the backend accepts (auto and one forced
 * kernel), plus one a device may refuse (skipped by the tuner). */
static int candidates_of(const char **c) {
  switch (moe_context_backend(th_ctx())) {
  case MOE_BACKEND_CPU:
    c[0] = "cpu.kernels=portable";
    c[1] = "cpu.kernels=auto";
    c[2] = "cpu.kernels=amx";
    return 3;
  case MOE_BACKEND_OPENCL:
    c[0] = "opencl.skinny=64x4x4";
    c[1] = "opencl.skinny=auto,opencl.route=serial";
    return 2;
  default:
    c[0] = "cuda.path=mma";
    c[1] = "cuda.path=auto";
    return 2;
  }
}

static moe_layer *make_layer(const th_layer_data *d) {
  moe_layer *layer = NULL;
  TH_OK(moe_layer_create(th_ctx(), &d->cfg, &d->weights, &layer));
  TH_OK(moe_layer_reserve(layer, d->num_tokens));
  return layer;
}

static void run(moe_layer *layer, const th_layer_data *d, int64_t T, uint16_t *out) {
  th_layer_forward_tokens(layer, th_ctx(), d, 0, T, out);
}

/* Sets each name=value of an option set on ctx, saving the old values. */
static int force(moe_context *ctx, const char *set, char names[4][64], char old[4][64]) {
  char buf[128];
  snprintf(buf, sizeof buf, "%s", set);
  int n = 0;
  for (char *p = strtok(buf, ","); p; p = strtok(NULL, ",")) {
    char *eq = strchr(p, '=');
    *eq = '\0';
    snprintf(names[n], 64, "%s", p);
    TH_OK(moe_context_get_option(ctx, p, old[n], 64));
    TH_OK(moe_context_set_option(ctx, p, eq + 1));
    ++n;
  }
  return n;
}

static void unforce(moe_context *ctx, int n, char names[4][64], char old[4][64]) {
  for (int i = n - 1; i >= 0; --i)
    TH_OK(moe_context_set_option(ctx, names[i], old[i]));
}

static void check_reference(const th_layer_data *d, int64_t T, const uint16_t *out) {
  const int64_t H = d->cfg.hidden_size;
  double *ref = th_malloc((size_t)(T * H) * sizeof(double));
  ref_layer_forward(&d->cfg, &d->weights, T, d->x, d->logits, true, ref);
  const double err = th_rel_error(out, ref, (size_t)(T * H));
  TH_ASSERT(err <= LAYER_BOUND, "T=%lld: relative error %.3g vs the float64 reference > %g",
            (long long)T, err, LAYER_BOUND);
  free(ref);
}

static void make_data(th_layer_data *d, int64_t T, int64_t H, int64_t I, uint64_t seed) {
  th_layer_spec s = {.num_tokens = T, .seed = seed};
  s.cfg = th_config(H, I, 6, 2);
  s.cfg.renormalize = 1;
  th_layer_data_make(d, &s);
}

Test(tune, tuned_forward_is_forcing_by_hand) {
  const char *cands[4];
  const int nc = candidates_of(cands);
  th_layer_data d;
  make_data(&d, 9, 96, 40, 13);
  moe_layer *tuned = make_layer(&d), *plain = make_layer(&d);
  const int64_t counts[] = {1, 4, 9};
  double times[3 * 4];
  TH_OK(moe_layer_tune(tuned, counts, 3, cands, nc, times));
  TH_ASSERT(moe_layer_tuning_count(tuned) == 3, "%d points, want 3", moe_layer_tuning_count(tuned));
  moe_context *ctx = th_ctx();
  const int64_t Ts[] = {1, 2, 4, 7, 9};
  for (size_t t = 0; t < sizeof Ts / sizeof Ts[0]; ++t) {
    const int64_t T = Ts[t];
    /* The point that holds T: the last count <= T. */
    int p = 0;
    while (p + 1 < 3 && counts[p + 1] <= T)
      ++p;
    int64_t from = 0;
    char chosen[128];
    TH_OK(moe_layer_tuning_entry(tuned, p, &from, chosen, sizeof chosen));
    TH_ASSERT(from == counts[p], "point %d starts at %lld", p, (long long)from);
    bool listed = false;
    for (int c = 0; c < nc; ++c) {
      listed |= strcmp(chosen, cands[c]) == 0;
      if (strcmp(chosen, cands[c]) == 0)
        TH_ASSERT(isfinite(times[p * nc + c]), "the choice %s has no time", chosen);
    }
    TH_ASSERT(listed, "choice \"%s\" is not a candidate", chosen);
    th_case("T=%lld, tuned choice %s", (long long)T, chosen);

    char d_tuned[1024], d_forced[1024];
    uint16_t *o_tuned = th_malloc((size_t)(T * 96) * 2),
             *o_forced = th_malloc((size_t)(T * 96) * 2);
    TH_OK(moe_layer_describe(tuned, T, d_tuned, sizeof d_tuned));
    run(tuned, &d, T, o_tuned);
    char names[4][64], old[4][64];
    const int n = force(ctx, chosen, names, old);
    TH_OK(moe_layer_describe(plain, T, d_forced, sizeof d_forced));
    run(plain, &d, T, o_forced);
    unforce(ctx, n, names, old);
    TH_ASSERT(strcmp(d_tuned, d_forced) == 0, "tuned \"%s\"\n    forced \"%s\"", d_tuned, d_forced);
    TH_ASSERT(memcmp(o_tuned, o_forced, (size_t)(T * 96) * 2) == 0,
              "the tuned output differs from the forced one");
    check_reference(&d, T, o_tuned);
    /* The options in force are the caller's again. */
    char now[64];
    for (int i = 0; i < n; ++i) {
      TH_OK(moe_context_get_option(ctx, names[i], now, sizeof now));
      TH_ASSERT(strcmp(now, old[i]) == 0, "%s is %s after the forward, was %s", names[i], now,
                old[i]);
    }
    free(o_tuned);
    free(o_forced);
  }
  moe_layer_clear_tuning(tuned);
  TH_ASSERT(moe_layer_tuning_count(tuned) == 0, "the table survived clear");
  moe_layer_destroy(tuned);
  moe_layer_destroy(plain);
  th_layer_data_free(&d);
}

static void temp_path(char *path, size_t size, const char *what) {
  snprintf(path, size, "%s/moe_test_tune_%ld_%s.txt", P_tmpdir, (long)getpid(), what);
}

Test(tune, save_load_round_trip) {
  const char *cands[4];
  const int nc = candidates_of(cands);
  th_layer_data d;
  make_data(&d, 6, 64, 32, 5);
  moe_layer *a = make_layer(&d), *b = make_layer(&d);
  const int64_t counts[] = {2, 6};
  TH_OK(moe_layer_tune(a, counts, 2, cands, nc, NULL));
  char path[512];
  temp_path(path, sizeof path, "round");
  TH_OK(moe_layer_save_tuning(a, path));
  TH_OK(moe_layer_load_tuning(b, path));
  TH_ASSERT(moe_layer_tuning_count(b) == 2, "%d points loaded", moe_layer_tuning_count(b));
  for (int i = 0; i < 2; ++i) {
    int64_t fa, fb;
    char ta[128], tb[128];
    TH_OK(moe_layer_tuning_entry(a, i, &fa, ta, sizeof ta));
    TH_OK(moe_layer_tuning_entry(b, i, &fb, tb, sizeof tb));
    TH_ASSERT(fa == fb && strcmp(ta, tb) == 0, "point %d: %lld %s vs %lld %s", i, (long long)fa, ta,
              (long long)fb, tb);
  }
  for (int64_t T = 1; T <= 6; T += 5) {
    uint16_t *oa = th_malloc((size_t)(T * 64) * 2), *ob = th_malloc((size_t)(T * 64) * 2);
    run(a, &d, T, oa);
    run(b, &d, T, ob);
    TH_ASSERT(memcmp(oa, ob, (size_t)(T * 64) * 2) == 0, "T=%lld: loaded table differs",
              (long long)T);
    check_reference(&d, T, ob);
    free(oa);
    free(ob);
  }
  /* The cache: MOE_TUNING_DIR (read when a context is created) gets the
   * tuned table, a new layer's reserve loads it. */
  char dir[512];
  snprintf(dir, sizeof dir, "%s/moe_test_tune_%ld_dir", P_tmpdir, (long)getpid());
  char cmd[600];
  snprintf(cmd, sizeof cmd, "mkdir -p '%s'", dir);
  TH_ASSERT(system(cmd) == 0, "cannot create %s", dir);
  setenv("MOE_TUNING_DIR", dir, 1);
  moe_context *cached = NULL;
  TH_OK(moe_context_create(moe_context_backend(th_ctx()), 0, &cached));
  unsetenv("MOE_TUNING_DIR");
  moe_layer *tuned_there = NULL, *c = NULL;
  TH_OK(moe_layer_create(cached, &d.cfg, &d.weights, &tuned_there));
  TH_OK(moe_layer_reserve(tuned_there, d.num_tokens));
  TH_OK(moe_layer_tune(tuned_there, counts, 2, cands, nc, NULL));
  TH_OK(moe_layer_create(cached, &d.cfg, &d.weights, &c));
  TH_OK(moe_layer_reserve(c, d.num_tokens));
  TH_ASSERT(moe_layer_tuning_count(c) == 2, "reserve loaded %d points from the cache",
            moe_layer_tuning_count(c));
  snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
  TH_ASSERT(system(cmd) == 0, "cannot remove %s", dir);
  moe_layer_destroy(c);
  moe_layer_destroy(tuned_there);
  moe_context_destroy(cached);
  remove(path);
  moe_layer_destroy(a);
  moe_layer_destroy(b);
  th_layer_data_free(&d);
}

Test(tune, mismatched_key_is_refused) {
  const char *cands[4];
  const int nc = candidates_of(cands);
  th_layer_data d, e;
  make_data(&d, 4, 64, 32, 7);
  make_data(&e, 4, 64, 48, 8); /* another I */
  moe_layer *a = make_layer(&d), *b = make_layer(&e);
  const int64_t counts[] = {4};
  TH_OK(moe_layer_tune(a, counts, 1, cands, nc, NULL));
  char path[512];
  temp_path(path, sizeof path, "mismatch");
  TH_OK(moe_layer_save_tuning(a, path));
  moe_status st = moe_layer_load_tuning(b, path);
  TH_ASSERT(st == MOE_ERROR_TUNING_MISMATCH, "another shape: %s", moe_status_string(st));
  TH_ASSERT(strstr(moe_last_error(th_ctx()), "shape"), "message \"%s\" names no shape",
            moe_last_error(th_ctx()));
  TH_ASSERT(moe_layer_tuning_count(b) == 0, "a refused table was installed");
  /* Another device name, same shape. */
  FILE *f = fopen(path, "r");
  char text[4096];
  const size_t len = fread(text, 1, sizeof text - 1, f);
  fclose(f);
  text[len] = '\0';
  char *dev = strstr(text, "\ndevice ");
  TH_ASSERT(dev != NULL, "no device line in\n%s", text);
  dev[8] = dev[8] == 'Z' ? 'Y' : 'Z';
  f = fopen(path, "w");
  fputs(text, f);
  fclose(f);
  st = moe_layer_load_tuning(a, path);
  TH_ASSERT(st == MOE_ERROR_TUNING_MISMATCH, "another device: %s", moe_status_string(st));
  TH_ASSERT(moe_layer_tuning_count(a) == 1, "a refused load dropped the table");
  remove(path);
  moe_layer_destroy(a);
  moe_layer_destroy(b);
  th_layer_data_free(&d);
  th_layer_data_free(&e);
}
