# Enables CUDA for the CUDA backend. Included from the top-level
# CMakeLists.txt, because CMake needs enable_language() in the directory of
# the targets that compile and link CUDA (moe_objects, moe, moe_static).
include(CheckLanguage)
check_language(CUDA)
moe_require(CMAKE_CUDA_COMPILER "the CUDA compiler nvcc"
            "nvidia-cuda-toolkit (or NVIDIA's cuda-toolkit package)")
if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES OR CMAKE_CUDA_ARCHITECTURES STREQUAL "")
  # Ampere and Hopper; Hopper-only code is guarded for the 90a target.
  # The normal variable too: check_language() can leave an empty one that
  # would shadow the cache entry.
  set(CMAKE_CUDA_ARCHITECTURES "80;90a" CACHE STRING "CUDA architectures" FORCE)
  set(CMAKE_CUDA_ARCHITECTURES "80;90a")
endif()
enable_language(CUDA)
find_package(CUDAToolkit REQUIRED)
