/*
 * test_buffer.c - device buffers and contexts on the backend under test:
 * writes and reads at offsets round-trip exactly, zero-byte transfers are
 * no-ops, sizes are reported, synchronize works, and two contexts of one
 * backend keep separate memory.
 */
#include "harness.h"

#include <string.h>

/* Every test ends by releasing its contexts; leaks fail it (ASan builds). */
TestSuite(buffer, .fini = th_suite_fini);

Test(buffer, round_trip_at_offsets) {
  th_case("buffer of 4099 bytes");
  moe_context *ctx = th_ctx();
  enum { SIZE = 4099 };
  uint8_t data[SIZE], back[SIZE];
  for (int i = 0; i < SIZE; ++i)
    data[i] = (uint8_t)(i * 37 + 11);
  moe_buffer *buffer = th_output(ctx, SIZE - TH_GUARD_BYTES);
  TH_ASSERT(moe_buffer_size(buffer) == SIZE, "moe_buffer_size = %zu, want %d",
            moe_buffer_size(buffer), SIZE);
  TH_OK(moe_buffer_write(buffer, 0, data, SIZE));
  TH_OK(moe_buffer_read(buffer, 0, back, SIZE));
  TH_ASSERT(memcmp(data, back, SIZE) == 0, "the whole buffer did not round-trip");
  /* An unaligned piece in the middle, then reads of odd pieces. */
  const uint8_t piece[5] = {1, 2, 3, 4, 5};
  TH_OK(moe_buffer_write(buffer, 1001, piece, sizeof piece));
  memcpy(data + 1001, piece, sizeof piece);
  for (size_t offset = 0; offset < SIZE; offset += 997) {
    const size_t bytes = SIZE - offset < 333 ? SIZE - offset : 333;
    memset(back, 0, sizeof back);
    TH_OK(moe_buffer_read(buffer, offset, back, bytes));
    TH_ASSERT(memcmp(back, data + offset, bytes) == 0, "read of %zu bytes at %zu differs", bytes,
              offset);
  }
  /* Zero bytes, even at the very end, is a no-op. */
  TH_OK(moe_buffer_write(buffer, SIZE, data, 0));
  TH_OK(moe_buffer_read(buffer, SIZE, back, 0));
  TH_OK(moe_buffer_read(buffer, 0, back, SIZE));
  TH_ASSERT(memcmp(data, back, SIZE) == 0, "a zero-byte transfer changed the buffer");
  TH_OK(moe_context_synchronize(ctx));
  moe_buffer_destroy(buffer);
}

Test(buffer, contexts_keep_separate_memory) {
  th_case("two contexts of one backend");
  moe_context *a = th_ctx(), *b = th_other_ctx();
  TH_ASSERT(a != b && moe_context_backend(a) == moe_context_backend(b),
            "th_other_ctx is not a second context of the same backend");
  const uint32_t one = 0x11111111u, two = 0x22222222u;
  uint32_t got_a = 0, got_b = 0;
  moe_buffer *ba = th_upload(a, &one, 4), *bb = th_upload(b, &two, 4);
  TH_OK(moe_buffer_read(ba, 0, &got_a, 4));
  TH_OK(moe_buffer_read(bb, 0, &got_b, 4));
  TH_ASSERT(got_a == one && got_b == two, "read back 0x%08x and 0x%08x", got_a, got_b);
  moe_buffer_destroy(ba);
  moe_buffer_destroy(bb);
}

Test(buffer, many_buffers_created_and_destroyed) {
  th_case("1000 buffers of 1 to 64 KiB");
  moe_context *ctx = th_ctx();
  moe_buffer *buffers[1000];
  for (int i = 0; i < 1000; ++i)
    TH_OK(moe_buffer_create(ctx, (size_t)(i % 64 + 1) * 1024, &buffers[i]));
  for (int i = 0; i < 1000; i += 2)
    moe_buffer_destroy(buffers[i]);
  for (int i = 1; i < 1000; i += 2)
    moe_buffer_destroy(buffers[i]);
}
