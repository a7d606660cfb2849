# nanobind (from the Python package) and the XLA FFI headers shipped in jaxlib.
execute_process(
  COMMAND "${Python_EXECUTABLE}" -m nanobind --cmake_dir
  OUTPUT_STRIP_TRAILING_WHITESPACE OUTPUT_VARIABLE nanobind_ROOT
  RESULT_VARIABLE _mar_nb_rc)
if(NOT _mar_nb_rc EQUAL 0)
  message(FATAL_ERROR "nanobind not found for ${Python_EXECUTABLE}: pip install nanobind")
endif()
find_package(nanobind CONFIG REQUIRED)

execute_process(
  COMMAND "${Python_EXECUTABLE}" -c "import jax.ffi; print(jax.ffi.include_dir())"
  OUTPUT_STRIP_TRAILING_WHITESPACE OUTPUT_VARIABLE JAX_FFI_INCLUDE_DIR
  RESULT_VARIABLE _mar_jax_rc)
if(NOT _mar_jax_rc EQUAL 0 OR NOT EXISTS "${JAX_FFI_INCLUDE_DIR}/xla/ffi/api/ffi.h")
  message(FATAL_ERROR "XLA FFI headers not found: jax must be importable at build time")
endif()
message(STATUS "XLA FFI headers: ${JAX_FFI_INCLUDE_DIR}")
