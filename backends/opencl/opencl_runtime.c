/*
 * opencl_runtime.c - the OpenCL plumbing of the backend: error names,
 * platform and device choice, and the one program each context builds,
 * through an on-disk cache of program binaries.
 *
 * Device choice: devices are listed GPUs first (in platform order), then
 * every other device; the `device` argument indexes that list. With device
 * 0, MOE_OPENCL_PLATFORM=<p> picks platform p (clGetPlatformIDs order) and
 * MOE_OPENCL_DEVICE=<d> its device d (or, without a platform, entry d of the
 * list).
 *
 * Cache: $XDG_CACHE_HOME/moe (else ~/.cache/moe) holds one file per program
 * binary, named by a hash of the device, driver, platform, build options and
 * program text. MOE_OPENCL_CACHE=0 turns it off. A file that is unreadable,
 * fails its checksum or is refused by the driver is ignored and replaced.
 */
#include "opencl_internal.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define MOE_OCL_MAX_PLATFORMS 16
#define MOE_OCL_MAX_DEVICES 64
static const char build_options[] = "";

static const char *const kernel_names[MOE_OCL_KERNEL_COUNT] = {
    [MOE_OCL_ROUTE] = "moe_route",
    [MOE_OCL_ROUTE_PARALLEL] = "moe_route_parallel",
    [MOE_OCL_ALIGN] = "moe_align",
    [MOE_OCL_GEMM_REFERENCE] = "moe_gemm_reference",
    [MOE_OCL_GEMM_SKINNY_ANY] = "moe_gemm_skinny_any",
    [MOE_OCL_GEMM_SKINNY_64X4X1U2] = "moe_gemm_skinny_64x4x1u2",
    [MOE_OCL_GEMM_SKINNY_64X4X4] = "moe_gemm_skinny_64x4x4",
    [MOE_OCL_GEMM_SKINNY_64X4X4U2] = "moe_gemm_skinny_64x4x4u2",
    [MOE_OCL_GEMM_SKINNY_64X8X4] = "moe_gemm_skinny_64x8x4",
    [MOE_OCL_GEMM_SKINNY_128X4X8] = "moe_gemm_skinny_128x4x8",
    [MOE_OCL_GEMM_ROWS_CPU] = "moe_gemm_rows_cpu",
    [MOE_OCL_GEMM_TILED_64] = "moe_gemm_tiled_64x64",
    [MOE_OCL_GEMM_TILED_128] = "moe_gemm_tiled_128x128",
    [MOE_OCL_ACTIVATION] = "moe_activation",
    [MOE_OCL_TOPK_REDUCE] = "moe_topk_reduce",
};

const char *moe_ocl_error_name(cl_int err) {
  switch (err) {
#define NAME(code)                                                                                 \
  case code:                                                                                       \
    return #code;
    NAME(CL_SUCCESS)
    NAME(CL_DEVICE_NOT_FOUND)
    NAME(CL_DEVICE_NOT_AVAILABLE)
    NAME(CL_COMPILER_NOT_AVAILABLE)
    NAME(CL_MEM_OBJECT_ALLOCATION_FAILURE)
    NAME(CL_OUT_OF_RESOURCES)
    NAME(CL_OUT_OF_HOST_MEMORY)
    NAME(CL_PROFILING_INFO_NOT_AVAILABLE)
    NAME(CL_MEM_COPY_OVERLAP)
    NAME(CL_IMAGE_FORMAT_MISMATCH)
    NAME(CL_IMAGE_FORMAT_NOT_SUPPORTED)
    NAME(CL_BUILD_PROGRAM_FAILURE)
    NAME(CL_MAP_FAILURE)
    NAME(CL_MISALIGNED_SUB_BUFFER_OFFSET)
    NAME(CL_EXEC_STATUS_ERROR_FOR_EVENTS_IN_WAIT_LIST)
    NAME(CL_COMPILE_PROGRAM_FAILURE)
    NAME(CL_LINKER_NOT_AVAILABLE)
    NAME(CL_LINK_PROGRAM_FAILURE)
    NAME(CL_DEVICE_PARTITION_FAILED)
    NAME(CL_KERNEL_ARG_INFO_NOT_AVAILABLE)
    NAME(CL_INVALID_VALUE)
    NAME(CL_INVALID_DEVICE_TYPE)
    NAME(CL_INVALID_PLATFORM)
    NAME(CL_INVALID_DEVICE)
    NAME(CL_INVALID_CONTEXT)
    NAME(CL_INVALID_QUEUE_PROPERTIES)
    NAME(CL_INVALID_COMMAND_QUEUE)
    NAME(CL_INVALID_HOST_PTR)
    NAME(CL_INVALID_MEM_OBJECT)
    NAME(CL_INVALID_IMAGE_FORMAT_DESCRIPTOR)
    NAME(CL_INVALID_IMAGE_SIZE)
    NAME(CL_INVALID_SAMPLER)
    NAME(CL_INVALID_BINARY)
    NAME(CL_INVALID_BUILD_OPTIONS)
    NAME(CL_INVALID_PROGRAM)
    NAME(CL_INVALID_PROGRAM_EXECUTABLE)
    NAME(CL_INVALID_KERNEL_NAME)
    NAME(CL_INVALID_KERNEL_DEFINITION)
    NAME(CL_INVALID_KERNEL)
    NAME(CL_INVALID_ARG_INDEX)
    NAME(CL_INVALID_ARG_VALUE)
    NAME(CL_INVALID_ARG_SIZE)
    NAME(CL_INVALID_KERNEL_ARGS)
    NAME(CL_INVALID_WORK_DIMENSION)
    NAME(CL_INVALID_WORK_GROUP_SIZE)
    NAME(CL_INVALID_WORK_ITEM_SIZE)
    NAME(CL_INVALID_GLOBAL_OFFSET)
    NAME(CL_INVALID_EVENT_WAIT_LIST)
    NAME(CL_INVALID_EVENT)
    NAME(CL_INVALID_OPERATION)
    NAME(CL_INVALID_GL_OBJECT)
    NAME(CL_INVALID_BUFFER_SIZE)
    NAME(CL_INVALID_MIP_LEVEL)
    NAME(CL_INVALID_GLOBAL_WORK_SIZE)
    NAME(CL_INVALID_PROPERTY)
    NAME(CL_INVALID_IMAGE_DESCRIPTOR)
    NAME(CL_INVALID_COMPILER_OPTIONS)
    NAME(CL_INVALID_LINKER_OPTIONS)
    NAME(CL_INVALID_DEVICE_PARTITION_COUNT)
#undef NAME
  case -1001:
    return "CL_PLATFORM_NOT_FOUND_KHR";
  default:
    return "an unknown OpenCL error";
  }
}

moe_status moe_ocl_fail(cl_int err, const char *what) {
  /* CL_INVALID_BUFFER_SIZE: more than CL_DEVICE_MAX_MEM_ALLOC_SIZE, i.e. a
   * request the device cannot hold. */
  moe_status st = (err == CL_MEM_OBJECT_ALLOCATION_FAILURE || err == CL_OUT_OF_HOST_MEMORY ||
                   err == CL_INVALID_BUFFER_SIZE)
                      ? MOE_ERROR_OUT_OF_MEMORY
                      : MOE_ERROR_DEVICE;
  return moe_set_error(st, "OpenCL: %s failed: %s (%d)", what, moe_ocl_error_name(err), (int)err);
}

/* ------------------------------------------------------------------------ */
/* Platforms and devices                                                    */
/* ------------------------------------------------------------------------ */

typedef struct device_ref {
  cl_platform_id platform;
  cl_device_id device;
  int is_gpu;
} device_ref;

static cl_uint get_platforms(cl_platform_id *platforms) {
  cl_uint count = 0;
  if (clGetPlatformIDs(MOE_OCL_MAX_PLATFORMS, platforms, &count) != CL_SUCCESS) return 0;
  return count < MOE_OCL_MAX_PLATFORMS ? count : MOE_OCL_MAX_PLATFORMS;
}

static cl_uint get_devices(cl_platform_id platform, cl_device_type type, cl_device_id *devices,
                           cl_uint capacity) {
  cl_uint count = 0;
  if (clGetDeviceIDs(platform, type, capacity, devices, &count) != CL_SUCCESS) return 0;
  return count < capacity ? count : capacity;
}

/* Every device, GPUs first; returns the count. */
static int list_devices(device_ref *list) {
  cl_platform_id platforms[MOE_OCL_MAX_PLATFORMS];
  cl_uint num_platforms = get_platforms(platforms);
  int count = 0;
  for (int pass = 0; pass < 2; ++pass) {
    cl_device_type type =
        pass == 0 ? CL_DEVICE_TYPE_GPU : (CL_DEVICE_TYPE_ALL & ~CL_DEVICE_TYPE_GPU);
    for (cl_uint p = 0; p < num_platforms; ++p) {
      cl_device_id devices[MOE_OCL_MAX_DEVICES];
      cl_uint n = get_devices(platforms[p], type, devices, MOE_OCL_MAX_DEVICES);
      for (cl_uint d = 0; d < n && count < MOE_OCL_MAX_DEVICES; ++d)
        list[count++] = (device_ref){platforms[p], devices[d], pass == 0};
    }
  }
  return count;
}

static int env_index(const char *name, int *value) {
  const char *text = getenv(name);
  if (!text || !*text) return 0;
  char *end;
  long v = strtol(text, &end, 10);
  if (*end || v < 0 || v > 1 << 20) return -1;
  *value = (int)v;
  return 1;
}

static moe_status choose_device(int device, device_ref *chosen) {
  cl_platform_id platforms[MOE_OCL_MAX_PLATFORMS];
  cl_uint num_platforms = get_platforms(platforms);
  if (num_platforms == 0)
    return moe_set_error(MOE_ERROR_BACKEND_UNAVAILABLE,
                         "OpenCL: no platform found (is an ICD such as pocl-opencl-icd or the "
                         "NVIDIA driver installed and registered?)");
  int env_platform = -1, env_device = -1;
  int has_platform = device == 0 ? env_index("MOE_OPENCL_PLATFORM", &env_platform) : 0;
  int has_device = device == 0 ? env_index("MOE_OPENCL_DEVICE", &env_device) : 0;
  if (has_platform < 0 || has_device < 0)
    return moe_set_error(MOE_ERROR_INVALID_ARGUMENT,
                         "OpenCL: MOE_OPENCL_PLATFORM and MOE_OPENCL_DEVICE must be indices");
  if (has_platform) {
    if (env_platform >= (int)num_platforms)
      return moe_set_error(MOE_ERROR_BACKEND_UNAVAILABLE,
                           "OpenCL: MOE_OPENCL_PLATFORM=%d, but there are %u platforms",
                           env_platform, num_platforms);
    cl_device_id devices[MOE_OCL_MAX_DEVICES];
    cl_uint n =
        get_devices(platforms[env_platform], CL_DEVICE_TYPE_ALL, devices, MOE_OCL_MAX_DEVICES);
    int d = has_device ? env_device : 0;
    if (d >= (int)n)
      return moe_set_error(MOE_ERROR_BACKEND_UNAVAILABLE,
                           "OpenCL: platform %d has %u devices, device %d asked for", env_platform,
                           n, d);
    cl_device_type type = 0;
    clGetDeviceInfo(devices[d], CL_DEVICE_TYPE, sizeof type, &type, NULL);
    *chosen = (device_ref){platforms[env_platform], devices[d], (type & CL_DEVICE_TYPE_GPU) != 0};
    return MOE_SUCCESS;
  }
  device_ref list[MOE_OCL_MAX_DEVICES];
  int count = list_devices(list);
  int index = has_device ? env_device : device;
  if (index >= count)
    return moe_set_error(MOE_ERROR_BACKEND_UNAVAILABLE,
                         "OpenCL: device %d asked for, but %d devices were found", index, count);
  *chosen = list[index];
  return MOE_SUCCESS;
}

static int backend_has_gpu(void) {
  cl_platform_id platforms[MOE_OCL_MAX_PLATFORMS];
  cl_uint num_platforms = get_platforms(platforms);
  for (cl_uint p = 0; p < num_platforms; ++p) {
    cl_uint count = 0;
    if (clGetDeviceIDs(platforms[p], CL_DEVICE_TYPE_GPU, 0, NULL, &count) == CL_SUCCESS &&
        count > 0)
      return 1;
  }
  return 0;
}

void moe_ocl_device_name(cl_device_id device, cl_platform_id platform, char *name,
                         size_t name_size) {
  char device_name[256] = "", platform_name[128] = "";
  clGetDeviceInfo(device, CL_DEVICE_NAME, sizeof device_name - 1, device_name, NULL);
  clGetPlatformInfo(platform, CL_PLATFORM_NAME, sizeof platform_name - 1, platform_name, NULL);
  const char *short_platform =
      strstr(platform_name, "Portable Computing Language") ? "PoCL" : platform_name;
  snprintf(name, name_size, "%s (OpenCL, %s)", device_name, short_platform);
}

/* ------------------------------------------------------------------------ */
/* Program build and binary cache                                           */
/* ------------------------------------------------------------------------ */

static uint64_t fnv1a(uint64_t hash, const void *data, size_t bytes) {
  const unsigned char *p = data;
  for (size_t i = 0; i < bytes; ++i)
    hash = (hash ^ p[i]) * 0x100000001b3ULL;
  return hash;
}

static uint64_t fnv1a_string(uint64_t hash, const char *text) {
  return fnv1a(hash, text, strlen(text) + 1);
}

/* The cache file for this device and program, or 0 when caching is off. */
static int cache_path(const moe_ocl_state *state, char *path, size_t path_size) {
  const char *enabled = getenv("MOE_OPENCL_CACHE");
  if (enabled && strcmp(enabled, "0") == 0) return 0;
  char dir[1024];
  const char *xdg = getenv("XDG_CACHE_HOME"), *home = getenv("HOME");
  if (xdg && *xdg)
    snprintf(dir, sizeof dir, "%s", xdg);
  else if (home && *home)
    snprintf(dir, sizeof dir, "%s/.cache", home);
  else
    return 0;
  if (mkdir(dir, 0755) != 0 && errno != EEXIST) return 0;
  size_t len = strlen(dir);
  snprintf(dir + len, sizeof dir - len, "/moe");
  if (mkdir(dir, 0755) != 0 && errno != EEXIST) return 0;

  char info[512];
  uint64_t hash = 0xcbf29ce484222325ULL;
  const cl_device_info device_infos[] = {CL_DEVICE_NAME, CL_DEVICE_VENDOR, CL_DRIVER_VERSION,
                                         CL_DEVICE_VERSION};
  for (size_t i = 0; i < sizeof device_infos / sizeof device_infos[0]; ++i) {
    info[0] = 0;
    clGetDeviceInfo(state->device, device_infos[i], sizeof info - 1, info, NULL);
    info[sizeof info - 1] = 0;
    hash = fnv1a_string(hash, info);
  }
  const cl_platform_info platform_infos[] = {CL_PLATFORM_NAME, CL_PLATFORM_VERSION};
  for (size_t i = 0; i < sizeof platform_infos / sizeof platform_infos[0]; ++i) {
    info[0] = 0;
    clGetPlatformInfo(state->platform, platform_infos[i], sizeof info - 1, info, NULL);
    info[sizeof info - 1] = 0;
    hash = fnv1a_string(hash, info);
  }
  hash = fnv1a_string(hash, build_options);
  for (size_t i = 0; i < moe_opencl_program_source_count; ++i)
    hash = fnv1a_string(hash, moe_opencl_program_sources[i]);
  snprintf(path, path_size, "%s/opencl-%016llx.bin", dir, (unsigned long long)hash);
  return 1;
}

/* File layout: magic, payload size, payload hash, payload. */
static const char cache_magic[8] = {'M', 'O', 'E', 'C', 'L', 'B', 'I', 'N'};

static unsigned char *cache_load(const char *path, size_t *size) {
  FILE *f = fopen(path, "rb");
  if (!f) return NULL;
  char magic[8];
  uint64_t header[2];
  unsigned char *payload = NULL;
  if (fread(magic, 1, 8, f) == 8 && memcmp(magic, cache_magic, 8) == 0 &&
      fread(header, sizeof header, 1, f) == 1 && header[0] > 0 && header[0] < (1ULL << 31)) {
    payload = malloc(header[0]);
    if (payload && (fread(payload, 1, header[0], f) != header[0] ||
                    fnv1a(0xcbf29ce484222325ULL, payload, header[0]) != header[1])) {
      free(payload);
      payload = NULL;
    }
  }
  fclose(f);
  if (payload) *size = header[0];
  return payload;
}

static void cache_store(const char *path, const unsigned char *payload, size_t size) {
  char temp[1200];
  snprintf(temp, sizeof temp, "%s.%ld.tmp", path, (long)getpid());
  FILE *f = fopen(temp, "wb");
  if (!f) return;
  uint64_t header[2] = {size, fnv1a(0xcbf29ce484222325ULL, payload, size)};
  int ok = fwrite(cache_magic, 1, 8, f) == 8 && fwrite(header, sizeof header, 1, f) == 1 &&
           fwrite(payload, 1, size, f) == size;
  ok = (fclose(f) == 0) && ok;
  /* rename is atomic: a concurrent reader sees the old file or the new one. */
  if (!ok || rename(temp, path) != 0) remove(temp);
}

static cl_program build_from_binary(moe_ocl_state *state, const unsigned char *binary,
                                    size_t size) {
  cl_int err, binary_status = CL_SUCCESS;
  cl_program program = clCreateProgramWithBinary(state->context, 1, &state->device, &size, &binary,
                                                 &binary_status, &err);
  if (err != CL_SUCCESS || binary_status != CL_SUCCESS) {
    if (program) clReleaseProgram(program);
    return NULL;
  }
  if (clBuildProgram(program, 1, &state->device, build_options, NULL, NULL) != CL_SUCCESS) {
    clReleaseProgram(program);
    return NULL;
  }
  return program;
}

static moe_status build_from_source(moe_ocl_state *state, cl_program *out) {
  cl_int err;
  cl_program program =
      clCreateProgramWithSource(state->context, (cl_uint)moe_opencl_program_source_count,
                                (const char **)moe_opencl_program_sources, NULL, &err);
  if (err != CL_SUCCESS) return moe_ocl_fail(err, "clCreateProgramWithSource");
  err = clBuildProgram(program, 1, &state->device, build_options, NULL, NULL);
  if (err != CL_SUCCESS) {
    char log[400] = "";
    clGetProgramBuildInfo(program, state->device, CL_PROGRAM_BUILD_LOG, sizeof log - 1, log, NULL);
    clReleaseProgram(program);
    return moe_set_error(MOE_ERROR_DEVICE, "OpenCL: building the kernels failed: %s: %s",
                         moe_ocl_error_name(err), log);
  }
  *out = program;
  return MOE_SUCCESS;
}

/* The program's binary for the cache; NULL when the driver gives none. */
static unsigned char *program_binary(cl_program program, size_t *size) {
  size_t sizes[1] = {0};
  if (clGetProgramInfo(program, CL_PROGRAM_BINARY_SIZES, sizeof sizes, sizes, NULL) != CL_SUCCESS ||
      sizes[0] == 0)
    return NULL;
  unsigned char *binary = malloc(sizes[0]);
  unsigned char *binaries[1] = {binary};
  if (binary && clGetProgramInfo(program, CL_PROGRAM_BINARIES, sizeof binaries, binaries, NULL) !=
                    CL_SUCCESS) {
    free(binary);
    return NULL;
  }
  *size = sizes[0];
  return binary;
}

moe_status moe_ocl_build_program(moe_ocl_state *state) {
  char path[1100];
  int cached = cache_path(state, path, sizeof path);
  cl_program program = NULL;
  if (cached) {
    size_t size = 0;
    unsigned char *binary = cache_load(path, &size);
    if (binary) program = build_from_binary(state, binary, size);
    free(binary);
  }
  if (!program) {
    moe_status st = build_from_source(state, &program);
    if (st != MOE_SUCCESS) return st;
    if (cached) {
      size_t size = 0;
      unsigned char *binary = program_binary(program, &size);
      if (binary) cache_store(path, binary, size);
      free(binary);
    }
  }
  state->program = program;
  for (int i = 0; i < MOE_OCL_KERNEL_COUNT; ++i) {
    cl_int err;
    state->kernels[i] = clCreateKernel(program, kernel_names[i], &err);
    if (err != CL_SUCCESS) return moe_ocl_fail(err, kernel_names[i]);
  }
  return MOE_SUCCESS;
}

void moe_ocl_state_free(moe_ocl_state *state) {
  if (!state) return;
  for (int i = 0; i < MOE_OCL_KERNEL_COUNT; ++i)
    if (state->kernels[i]) clReleaseKernel(state->kernels[i]);
  if (state->program) clReleaseProgram(state->program);
  if (state->queue) clReleaseCommandQueue(state->queue);
  if (state->context) clReleaseContext(state->context);
  free(state);
}

/* ------------------------------------------------------------------------ */
/* Context entries of the operation table                                   */
/* ------------------------------------------------------------------------ */

moe_status moe_ocl_context_create(int device, void **state_out, char *name, size_t name_size) {
  device_ref chosen;
  moe_status st = choose_device(device, &chosen);
  if (st != MOE_SUCCESS) return st;
  moe_ocl_state *state = calloc(1, sizeof *state);
  if (!state) return moe_set_error(MOE_ERROR_OUT_OF_MEMORY, "cannot allocate the OpenCL state");
  state->platform = chosen.platform;
  state->device = chosen.device;
  state->is_gpu = chosen.is_gpu;
  cl_int err;
  cl_context_properties props[] = {CL_CONTEXT_PLATFORM, (cl_context_properties)chosen.platform, 0};
  state->context = clCreateContext(props, 1, &chosen.device, NULL, NULL, &err);
  if (err == CL_SUCCESS)
    state->queue = clCreateCommandQueue(state->context, chosen.device, 0, &err);
  st = err == CL_SUCCESS
           ? moe_ocl_build_program(state)
           : moe_ocl_fail(err, state->context ? "clCreateCommandQueue" : "clCreateContext");
  if (st != MOE_SUCCESS) {
    moe_ocl_state_free(state);
    return st;
  }
  moe_ocl_device_name(chosen.device, chosen.platform, name, name_size);
  *state_out = state;
  return MOE_SUCCESS;
}

int moe_ocl_has_gpu(void) {
  return backend_has_gpu();
}
