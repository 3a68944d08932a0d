# Helpers for backends: which to build, and how a backend adds its sources
# and link libraries to the library.

# Expands "auto", "all" or a list into the backends to build (cpu first).
function(moe_resolve_backends spec out)
  set(known cpu cuda opencl)
  set(result cpu)
  if(spec STREQUAL "auto")
    include(CheckLanguage)
    check_language(CUDA)
    if(CMAKE_CUDA_COMPILER)
      list(APPEND result cuda)
    endif()
    find_package(OpenCL QUIET)
    find_package(CLBlast QUIET CONFIG)
    if(OpenCL_FOUND AND CLBlast_FOUND)
      list(APPEND result opencl)
    endif()
  elseif(spec STREQUAL "all")
    list(APPEND result cuda opencl)
  else()
    foreach(b IN LISTS spec)
      if(NOT b IN_LIST known)
        message(FATAL_ERROR "MOE_BACKEND: unknown backend '${b}' (use cpu, cuda, opencl, all, auto)")
      endif()
      list(APPEND result ${b})
    endforeach()
  endif()
  list(REMOVE_DUPLICATES result)
  set(${out} ${result} PARENT_SCOPE)
endfunction()

# Adds sources to the library (call from backends/<name>/CMakeLists.txt).
function(moe_backend_sources)
  target_sources(moe_objects PRIVATE ${ARGN})
endfunction()

# Libraries the library must link for a backend (imported targets).
function(moe_backend_link_libraries)
  set_property(GLOBAL APPEND PROPERTY MOE_BACKEND_LIBS ${ARGN})
  target_link_libraries(moe_objects PRIVATE ${ARGN})
endfunction()

# Stops the configure when a requested backend's dependency is missing.
function(moe_require found what package)
  if(NOT ${found})
    message(FATAL_ERROR "MOE_BACKEND asks for a backend that needs ${what}, which was not found. "
                        "On Debian/Ubuntu: apt-get install ${package} "
                        "(or run scripts/install-deps.sh)")
  endif()
endfunction()
