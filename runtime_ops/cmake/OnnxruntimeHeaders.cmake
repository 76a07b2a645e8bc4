# Find onnxruntime's C/C++ API headers (the PyPI wheels carry none).
# Order: -DONNXRUNTIME_INCLUDE_DIR / env ONNXRUNTIME_INCLUDE_DIR, a system
# install, else fetch Debian trixie's libonnxruntime-dev 1.21 into the build
# folder with a private apt sources list (nothing system-wide changes).
# Result: ONNXRUNTIME_INCLUDE_DIR, ONNXRUNTIME_API_VERSION.

set(_ORT_MAX_API 21)  # the oldest onnxruntime we support (pyproject: >=1.21) speaks API 21

if(NOT ONNXRUNTIME_INCLUDE_DIR AND DEFINED ENV{ONNXRUNTIME_INCLUDE_DIR})
  set(ONNXRUNTIME_INCLUDE_DIR $ENV{ONNXRUNTIME_INCLUDE_DIR})
endif()
if(NOT ONNXRUNTIME_INCLUDE_DIR)
  find_path(_ort_sys onnxruntime_c_api.h PATHS /usr/include/onnxruntime /usr/local/include/onnxruntime NO_DEFAULT_PATH)
  if(_ort_sys)
    set(ONNXRUNTIME_INCLUDE_DIR ${_ort_sys})
  endif()
endif()
if(NOT ONNXRUNTIME_INCLUDE_DIR)
  set(_dir ${CMAKE_BINARY_DIR}/onnxruntime-headers)
  if(NOT EXISTS ${_dir}/x/usr/include/onnxruntime/onnxruntime_c_api.h)
    message(STATUS "onnxruntime headers: fetching Debian trixie libonnxruntime-dev into ${_dir}")
    execute_process(
      COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/fetch_onnxruntime_headers.sh ${_dir}
      RESULT_VARIABLE _rc)
    if(NOT _rc EQUAL 0)
      message(FATAL_ERROR "could not fetch onnxruntime headers (exit ${_rc}); set ONNXRUNTIME_INCLUDE_DIR "
                          "to a folder holding onnxruntime_c_api.h (API <= ${_ORT_MAX_API})")
    endif()
  endif()
  set(ONNXRUNTIME_INCLUDE_DIR ${_dir}/x/usr/include/onnxruntime)
endif()

if(NOT EXISTS ${ONNXRUNTIME_INCLUDE_DIR}/onnxruntime_c_api.h)
  message(FATAL_ERROR "ONNXRUNTIME_INCLUDE_DIR=${ONNXRUNTIME_INCLUDE_DIR} has no onnxruntime_c_api.h")
endif()
file(STRINGS ${ONNXRUNTIME_INCLUDE_DIR}/onnxruntime_c_api.h _api REGEX "^#define ORT_API_VERSION [0-9]+")
string(REGEX REPLACE "^#define ORT_API_VERSION ([0-9]+).*" "\\1" ONNXRUNTIME_API_VERSION "${_api}")
if(ONNXRUNTIME_API_VERSION GREATER _ORT_MAX_API)
  message(FATAL_ERROR "onnxruntime headers in ${ONNXRUNTIME_INCLUDE_DIR} are API ${ONNXRUNTIME_API_VERSION}, "
                      "expected <= ${_ORT_MAX_API}: a library built against newer headers fails to load in onnxruntime 1.21")
endif()
message(STATUS "onnxruntime headers: ${ONNXRUNTIME_INCLUDE_DIR} (API ${ONNXRUNTIME_API_VERSION})")
