# CheckAmxRequests.cmake - the cpu-amx-requests test (cmake -P): does the
# compiled AMX kernel path still issue its near weight requests?
#
# GCC 12 counts a prefetch as no side effect, and deleted the AMX kernel's
# loop of nothing but prefetches at -O1 and above; nothing in the results
# shows it (a prefetch is a hint), so every AMX prefetch A/B before
# 2026-12-07 measured a kernel without them. cpu_amx_intrinsics.h keeps each
# request with an empty volatile asm; this test fails if a compiler or an
# edit loses them again: the object of cpu_kernels_amx.c must hold
# prefetcht0 instructions (the near requests; the next-K-block stream is
# prefetcht1).
#
# Variables: OBJDUMP (the toolchain's objdump), OBJECTS (the moe_objects
# library's object files).
foreach(object IN LISTS OBJECTS)
  if(object MATCHES "cpu_kernels_amx\\.c\\.o(bj)?$")
    set(amx_object "${object}")
  endif()
endforeach()
if(NOT amx_object)
  message(FATAL_ERROR "cpu-amx-requests: no cpu_kernels_amx object among ${OBJECTS}")
endif()
execute_process(COMMAND "${OBJDUMP}" -d --no-show-raw-insn "${amx_object}"
                OUTPUT_VARIABLE listing RESULT_VARIABLE status)
if(NOT status EQUAL 0)
  message(FATAL_ERROR "cpu-amx-requests: ${OBJDUMP} failed on ${amx_object}")
endif()
string(REGEX MATCHALL "prefetcht0" near "${listing}")
string(REGEX MATCHALL "tdpbf16ps" multiplies "${listing}")
list(LENGTH near near_count)
list(LENGTH multiplies multiply_count)
if(near_count EQUAL 0 OR multiply_count EQUAL 0)
  message(FATAL_ERROR "cpu-amx-requests: ${amx_object} holds ${near_count} prefetcht0 and "
                      "${multiply_count} tdpbf16ps: the kernel's near weight requests are gone")
endif()
message(STATUS "cpu-amx-requests: ${near_count} prefetcht0 beside ${multiply_count} tdpbf16ps")
