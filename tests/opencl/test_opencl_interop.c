/*
 * test_opencl_interop.c - OpenCL-only cases: a context on the caller's
 * command queue, the caller's cl_mem wrapped as buffers (never released by
 * the library), their argument checks, device choice by environment, and
 * the program binary cache falling back to a source build when its file is
 * corrupt. Skipped unless MOE_TEST_BACKEND=opencl.
 */
#include "harness.h"
#include "moe_opencl.h"

#define CL_TARGET_OPENCL_VERSION 120
#include <CL/cl.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

static void skip_unless_opencl(void) {
  const char *backend = getenv("MOE_TEST_BACKEND");
  if (!backend || strcmp(backend, "opencl") != 0)
    cr_skip_test("OpenCL interop cases run only with MOE_TEST_BACKEND=opencl");
}

/* The caller's own OpenCL objects: the first device of the first platform
 * that has one. */
typedef struct user_cl {
  cl_context context;
  cl_device_id device;
  cl_command_queue queue;
} user_cl;

static user_cl user_cl_create(void) {
  user_cl u = {0};
  cl_platform_id platforms[8];
  cl_uint count = 0;
  cr_assert_eq(clGetPlatformIDs(8, platforms, &count), CL_SUCCESS, "no OpenCL platform");
  for (cl_uint p = 0; p < count && !u.device; ++p)
    if (clGetDeviceIDs(platforms[p], CL_DEVICE_TYPE_ALL, 1, &u.device, NULL) != CL_SUCCESS)
      u.device = NULL;
  cr_assert(u.device != NULL, "no OpenCL device");
  cl_int err;
  u.context = clCreateContext(NULL, 1, &u.device, NULL, NULL, &err);
  cr_assert_eq(err, CL_SUCCESS);
  u.queue = clCreateCommandQueue(u.context, u.device, 0, &err);
  cr_assert_eq(err, CL_SUCCESS);
  return u;
}

static void user_cl_destroy(user_cl *u) {
  clReleaseCommandQueue(u->queue);
  clReleaseContext(u->context);
}

static cl_mem user_buffer(const user_cl *u, size_t bytes, const void *init) {
  cl_int err;
  cl_mem mem = clCreateBuffer(u->context, CL_MEM_READ_WRITE, bytes, NULL, &err);
  cr_assert_eq(err, CL_SUCCESS);
  if (init)
    cr_assert_eq(clEnqueueWriteBuffer(u->queue, mem, CL_TRUE, 0, bytes, init, 0, NULL, NULL),
                 CL_SUCCESS);
  return mem;
}

static cl_uint reference_count(cl_mem mem) {
  cl_uint refs = 0;
  clGetMemObjectInfo(mem, CL_MEM_REFERENCE_COUNT, sizeof refs, &refs, NULL);
  return refs;
}

Test(opencl_interop, route_on_user_queue_and_memory) {
  skip_unless_opencl();
  user_cl u = user_cl_create();
  moe_context *ctx = NULL;
  TH_OK(moe_opencl_context_create_on_queue(u.queue, &ctx));
  cr_assert_eq(moe_context_backend(ctx), MOE_BACKEND_OPENCL);
  cr_assert_eq(moe_opencl_context_queue(ctx), (void *)u.queue);

  enum { T = 37, E = 16, K = 4 };
  moe_config cfg;
  moe_config_init(&cfg);
  cfg.hidden_size = 8;
  cfg.intermediate_size = 8;
  cfg.num_experts = E;
  cfg.top_k = K;
  cfg.renormalize = 1;
  th_case("T=%d E=%d k=%d on a user queue", T, E, K);
  th_rng rng = th_rng_make(11);
  float logits[T * E];
  th_fill_f32(&rng, logits, T * E, 1.0);
  cl_mem m_logits = user_buffer(&u, sizeof logits, logits);
  cl_mem m_ids = user_buffer(&u, T * K * 4, NULL), m_weights = user_buffer(&u, T * K * 4, NULL);
  moe_buffer *b_logits, *b_ids, *b_weights;
  TH_OK(moe_opencl_buffer_wrap(ctx, m_logits, sizeof logits, &b_logits));
  TH_OK(moe_opencl_buffer_wrap(ctx, m_ids, T * K * 4, &b_ids));
  TH_OK(moe_opencl_buffer_wrap(ctx, m_weights, T * K * 4, &b_weights));
  TH_OK(moe_route(ctx, &cfg, T, b_logits, NULL, b_ids, b_weights));
  /* The work is on the user's queue: a read there sees it in order. */
  int32_t ids[T * K], want_ids[T * K];
  double want_weights[T * K];
  cr_assert_eq(clEnqueueReadBuffer(u.queue, m_ids, CL_TRUE, 0, sizeof ids, ids, 0, NULL, NULL),
               CL_SUCCESS);
  ref_route(&cfg, T, logits, NULL, want_ids, want_weights);
  for (int i = 0; i < T * K; ++i)
    TH_ASSERT(ids[i] == want_ids[i], "slot %d: id %d, want %d", i, ids[i], want_ids[i]);

  moe_buffer_destroy(b_logits);
  moe_buffer_destroy(b_ids);
  moe_buffer_destroy(b_weights);
  moe_context_destroy(ctx);
  /* Ours again, alone: the library released exactly what it retained. */
  cr_assert_eq(reference_count(m_logits), 1);
  cr_assert_eq(clFinish(u.queue), CL_SUCCESS);
  clReleaseMemObject(m_logits);
  clReleaseMemObject(m_ids);
  clReleaseMemObject(m_weights);
  user_cl_destroy(&u);
}

Test(opencl_interop, wrap_checks_arguments) {
  skip_unless_opencl();
  user_cl u = user_cl_create();
  moe_context *ctx = NULL;
  TH_OK(moe_opencl_context_create_on_queue(u.queue, &ctx));
  cl_mem mem = user_buffer(&u, 64, NULL);
  moe_buffer *b = (moe_buffer *)0x1;
  cr_assert_eq(moe_opencl_buffer_wrap(NULL, mem, 64, &b), MOE_ERROR_NULL_POINTER);
  cr_assert_eq(moe_opencl_buffer_wrap(ctx, NULL, 64, &b), MOE_ERROR_NULL_POINTER);
  cr_assert_eq(moe_opencl_buffer_wrap(ctx, mem, 64, NULL), MOE_ERROR_NULL_POINTER);
  cr_assert_eq(moe_opencl_buffer_wrap(ctx, mem, 0, &b), MOE_ERROR_INVALID_ARGUMENT);
  cr_assert_eq(moe_opencl_buffer_wrap(ctx, mem, 65, &b), MOE_ERROR_BUFFER_TOO_SMALL);
  cr_assert(strstr(moe_last_error(ctx), "64") != NULL, "message: %s", moe_last_error(ctx));
  cr_assert_eq(b, (moe_buffer *)0x1, "an output was touched on error");

  /* A cl_mem of another cl_context. */
  user_cl other = user_cl_create();
  cl_mem foreign = user_buffer(&other, 64, NULL);
  cr_assert_eq(moe_opencl_buffer_wrap(ctx, foreign, 64, &b), MOE_ERROR_CONTEXT_MISMATCH);

  /* A CPU context cannot wrap a cl_mem. */
  moe_context *cpu = NULL;
  TH_OK(moe_context_create(MOE_BACKEND_CPU, 0, &cpu));
  cr_assert_eq(moe_opencl_buffer_wrap(cpu, mem, 64, &b), MOE_ERROR_INVALID_ARGUMENT);
  cr_assert_null(moe_opencl_context_queue(cpu));
  moe_context_destroy(cpu);

  cr_assert_eq(moe_opencl_context_create_on_queue(NULL, &ctx), MOE_ERROR_NULL_POINTER);
  cr_assert_eq(moe_opencl_context_create_on_queue(u.queue, NULL), MOE_ERROR_NULL_POINTER);

  moe_context_destroy(ctx);
  clReleaseMemObject(foreign);
  clReleaseMemObject(mem);
  user_cl_destroy(&other);
  user_cl_destroy(&u);
}

Test(opencl_interop, environment_picks_the_device) {
  skip_unless_opencl();
  moe_context *ctx = NULL;
  setenv("MOE_OPENCL_PLATFORM", "999", 1);
  cr_assert_eq(moe_context_create(MOE_BACKEND_OPENCL, 0, &ctx), MOE_ERROR_BACKEND_UNAVAILABLE);
  cr_assert(strstr(moe_last_error(NULL), "MOE_OPENCL_PLATFORM") != NULL, "message: %s",
            moe_last_error(NULL));
  setenv("MOE_OPENCL_PLATFORM", "0", 1);
  setenv("MOE_OPENCL_DEVICE", "0", 1);
  TH_OK(moe_context_create(MOE_BACKEND_OPENCL, 0, &ctx));
  cr_assert(strstr(moe_context_device_name(ctx), "OpenCL") != NULL);
  moe_context_destroy(ctx);
  unsetenv("MOE_OPENCL_PLATFORM");
  unsetenv("MOE_OPENCL_DEVICE");
  cr_assert_eq(moe_context_create(MOE_BACKEND_OPENCL, 4096, &ctx), MOE_ERROR_BACKEND_UNAVAILABLE);
}

/* Writes a garbage file into dst for every cache file name in src (the
 * name is the cache key), so the next context finds a corrupt binary
 * without first paying for a build; returns how many. */
static int plant_corrupt_cache(const char *src, const char *dst) {
  DIR *d = opendir(src);
  if (!d) return 0;
  int count = 0;
  struct dirent *entry;
  while ((entry = readdir(d))) {
    if (strncmp(entry->d_name, "opencl-", 7) != 0 || strstr(entry->d_name, ".tmp")) continue;
    char path[1400];
    snprintf(path, sizeof path, "%s/%s", dst, entry->d_name);
    FILE *f = fopen(path, "wb");
    if (!f) continue;
    fputs("MOECLBIN this is not a program binary", f);
    fclose(f);
    ++count;
  }
  closedir(d);
  return count;
}

Test(opencl_interop, corrupt_binary_cache_falls_back_to_source) {
  skip_unless_opencl();
  /* A context with the default cache first: its key names the file. */
  moe_context *ctx = NULL;
  TH_OK(moe_context_create(MOE_BACKEND_OPENCL, 0, &ctx));
  moe_context_destroy(ctx);
  char default_dir[1100];
  const char *xdg = getenv("XDG_CACHE_HOME"), *home = getenv("HOME");
  if (xdg && *xdg)
    snprintf(default_dir, sizeof default_dir, "%s/moe", xdg);
  else
    snprintf(default_dir, sizeof default_dir, "%s/.cache/moe", home ? home : "/nonexistent");

  char dir[] = "/tmp/moe-ocl-cache-XXXXXX";
  cr_assert_not_null(mkdtemp(dir));
  char cache_dir[1100];
  snprintf(cache_dir, sizeof cache_dir, "%s/moe", dir);
  cr_assert_eq(mkdir(cache_dir, 0755), 0);
  setenv("XDG_CACHE_HOME", dir, 1);
  setenv("MOE_OPENCL_CACHE", "1", 1);
  if (plant_corrupt_cache(default_dir, cache_dir) == 0) {
    /* No default cache (turned off): make one here, then spoil it. */
    TH_OK(moe_context_create(MOE_BACKEND_OPENCL, 0, &ctx));
    moe_context_destroy(ctx);
    char copy[1200];
    snprintf(copy, sizeof copy, "%s.orig", cache_dir);
    cr_assert_eq(rename(cache_dir, copy), 0);
    cr_assert_eq(mkdir(cache_dir, 0755), 0);
    cr_assert_gt(plant_corrupt_cache(copy, cache_dir), 0, "no cache file was written");
  }
  TH_OK(moe_context_create(MOE_BACKEND_OPENCL, 0, &ctx));
  /* It still computes: a tiny route on the rebuilt program. */
  moe_config cfg;
  moe_config_init(&cfg);
  cfg.hidden_size = 8;
  cfg.intermediate_size = 8;
  cfg.num_experts = 4;
  cfg.top_k = 1;
  const float logits[4] = {0.5f, 2.0f, -1.0f, 1.0f};
  moe_buffer *b_logits, *b_ids, *b_weights;
  TH_OK(moe_buffer_create(ctx, sizeof logits, &b_logits));
  TH_OK(moe_buffer_write(b_logits, 0, logits, sizeof logits));
  TH_OK(moe_buffer_create(ctx, 4, &b_ids));
  TH_OK(moe_buffer_create(ctx, 4, &b_weights));
  TH_OK(moe_route(ctx, &cfg, 1, b_logits, NULL, b_ids, b_weights));
  int32_t id = -1;
  TH_OK(moe_buffer_read(b_ids, 0, &id, 4));
  cr_assert_eq(id, 1);
  moe_buffer_destroy(b_logits);
  moe_buffer_destroy(b_ids);
  moe_buffer_destroy(b_weights);
  moe_context_destroy(ctx);
  char command[1200];
  snprintf(command, sizeof command, "rm -rf '%s'", dir);
  cr_assert_eq(system(command), 0);
}
