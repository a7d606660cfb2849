# Decides MAR_WITH_CUDA from JAX_MOE_AR_CUDA and holds the one set of nvcc flags.
set(MAR_WITH_CUDA OFF)
# The one GPU architecture the kernels are compiled for (build_info() reports it).
set(MAR_CUDA_ARCH "90a")
if(NOT JAX_MOE_AR_CUDA STREQUAL "OFF")
  include(CheckLanguage)
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    set(MAR_WITH_CUDA ON)
  elseif(JAX_MOE_AR_CUDA STREQUAL "ON")
    message(FATAL_ERROR "JAX_MOE_AR_CUDA=ON but no CUDA compiler was found")
  endif()
endif()

if(MAR_WITH_CUDA)
  # Architectures are given by hand below (-gencode for sm_${MAR_CUDA_ARCH}).
  set(CMAKE_CUDA_ARCHITECTURES OFF)
  enable_language(CUDA)
  find_package(CUDAToolkit REQUIRED)
  message(STATUS "jax_moe_ar: building CUDA kernels for sm_${MAR_CUDA_ARCH} with ${CMAKE_CUDA_COMPILER}")
else()
  message(STATUS "jax_moe_ar: CPU-only build")
endif()

# Every target with CUDA code: sm_90a, IEEE arithmetic, line info for profilers.
function(mar_cuda_flags target)
  target_compile_definitions(${target} PRIVATE JAX_MOE_AR_WITH_CUDA=1
                                               JAX_MOE_AR_CUDA_ARCH="sm_${MAR_CUDA_ARCH}")
  # No fast-math and no FMA contraction: SPEC §3 needs IEEE division, sqrt and denormals,
  # and every product and sum rounded separately.
  target_compile_options(${target} PRIVATE
    $<$<COMPILE_LANGUAGE:CUDA>:-gencode=arch=compute_${MAR_CUDA_ARCH},code=sm_${MAR_CUDA_ARCH} -fmad=false -lineinfo -Xptxas=-v>)
  set_target_properties(${target} PROPERTIES CUDA_STANDARD 17)
  target_include_directories(${target} PRIVATE ${CUDAToolkit_INCLUDE_DIRS})
  target_link_libraries(${target} PRIVATE CUDA::cudart_static)
endfunction()
