/* cpu_backend.c - placeholder table; replaced by the CPU backend work. */
#include "backend.h"

#include <stdlib.h>
#include <string.h>

static moe_status cpu_context_create(int device, void **state, char *name, size_t name_size) {
  (void)device;
  *state = NULL;
  strncpy(name, "cpu", name_size - 1);
  return MOE_SUCCESS;
}
static void cpu_context_destroy(void *state) { (void)state; }
static moe_status cpu_synchronize(void *state) { (void)state; return MOE_SUCCESS; }
static moe_status cpu_buffer_alloc(void *state, size_t bytes, void **handle) {
  (void)state;
  *handle = malloc(bytes);
  return *handle ? MOE_SUCCESS : moe_set_error(MOE_ERROR_OUT_OF_MEMORY, "malloc(%zu) failed", bytes);
}
static void cpu_buffer_free(void *state, void *handle) { (void)state; free(handle); }
static moe_status cpu_buffer_write(void *state, void *handle, size_t offset, const void *src, size_t bytes) {
  (void)state;
  memcpy((char *)handle + offset, src, bytes);
  return MOE_SUCCESS;
}
static moe_status cpu_buffer_read(void *state, const void *handle, size_t offset, void *dst, size_t bytes) {
  (void)state;
  memcpy(dst, (const char *)handle + offset, bytes);
  return MOE_SUCCESS;
}
const moe_backend_ops moe_cpu_backend_ops = {
    .name = "cpu",
    .kind = MOE_BACKEND_CPU,
    .context_create = cpu_context_create,
    .context_destroy = cpu_context_destroy,
    .synchronize = cpu_synchronize,
    .buffer_alloc = cpu_buffer_alloc,
    .buffer_free = cpu_buffer_free,
    .buffer_write = cpu_buffer_write,
    .buffer_read = cpu_buffer_read,
};
