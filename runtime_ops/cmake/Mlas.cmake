# MLAS's x86-64 FMA3 direct-convolution kernels (NCHWc and NCHW-input), assembled from Debian
# trixie's onnxruntime 1.21 source tarball (MIT) fetched into the build folder at configure time;
# nothing of it is committed. Only the assembly kernels are built (MLAS's C++ driver, dispatch
# table and thread pool are not: runtime_ops/src/nchwc.cc drives the kernels itself), so this
# adds seconds, not minutes, to the build.
# Order: -DONNXZERO_MLAS_SOURCE_DIR / env ONNXZERO_MLAS_SOURCE_DIR (a folder holding
# onnxruntime/core/mlas), else fetch. -DONNXZERO_MLAS=OFF (or a failed fetch) builds without it:
# ConvRelu then runs on the own GEMM core.
# Result: ONNXZERO_MLAS_SOURCES (the .S files, empty without MLAS), ONNXZERO_HAVE_MLAS.

option(ONNXZERO_MLAS "Use MLAS's convolution kernels for the dense path (fetched at build time)" ON)
set(ONNXZERO_MLAS_SOURCES "")
set(ONNXZERO_HAVE_MLAS OFF)
if(ONNXZERO_MLAS AND CMAKE_SYSTEM_PROCESSOR MATCHES "x86_64|AMD64|amd64")
  if(NOT ONNXZERO_MLAS_SOURCE_DIR AND DEFINED ENV{ONNXZERO_MLAS_SOURCE_DIR})
    set(ONNXZERO_MLAS_SOURCE_DIR $ENV{ONNXZERO_MLAS_SOURCE_DIR})
  endif()
  if(NOT ONNXZERO_MLAS_SOURCE_DIR)
    set(_dir ${CMAKE_BINARY_DIR}/mlas-source)
    set(ONNXZERO_MLAS_SOURCE_DIR ${_dir}/src)
    if(NOT EXISTS ${ONNXZERO_MLAS_SOURCE_DIR}/onnxruntime/core/mlas/lib/x86_64/SconvKernelFma3.S)
      message(STATUS "MLAS: fetching Debian trixie's onnxruntime source tarball into ${_dir}")
      execute_process(COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/fetch_mlas_source.sh ${_dir} RESULT_VARIABLE _rc)
      if(NOT _rc EQUAL 0)
        message(WARNING "MLAS: fetch failed (exit ${_rc}); building without it (ConvRelu on the own GEMM core). "
                        "Set ONNXZERO_MLAS_SOURCE_DIR to an onnxruntime source tree to use it.")
      endif()
    endif()
  endif()
  set(_x86 ${ONNXZERO_MLAS_SOURCE_DIR}/onnxruntime/core/mlas/lib/x86_64)
  if(EXISTS ${_x86}/SconvKernelFma3.S)
    enable_language(ASM)
    # SconvKernelAvx.S holds the post-processing (bias, ReLU, stores) the FMA3 kernels call;
    # SconvKernelAvx512F.S the 16-channel-block kernels, used when the CPU has AVX-512F (chosen at
    # run time, as onnxruntime does).
    set(ONNXZERO_MLAS_SOURCES ${_x86}/SconvKernelFma3.S ${_x86}/SconvKernelAvx.S ${_x86}/SconvKernelAvx512F.S)
    set_source_files_properties(${ONNXZERO_MLAS_SOURCES} PROPERTIES
      LANGUAGE ASM
      INCLUDE_DIRECTORIES "${_x86}")
    set(ONNXZERO_HAVE_MLAS ON)
    message(STATUS "MLAS: convolution kernels from ${_x86}")
  endif()
endif()
