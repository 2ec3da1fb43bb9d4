# cmake -DSOURCE_DIR=<repo> -DREV=<git revision, or empty> -DOUT_DIR=<dir> -P base_headers.cmake
#
# Writes the baseline headers compare_bench measures against: include/moe at revision REV of the
# repository at SOURCE_DIR (the working tree's own headers when REV is empty) as OUT_DIR/moe_base,
# renamed so that both versions compile into one program: namespace moe becomes moe_base and the
# MOE_ macros MOEBASE_ (each header's #pragma once is per file, so both sets are included whole).
cmake_minimum_required(VERSION 3.18)
foreach(var SOURCE_DIR OUT_DIR)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "base_headers.cmake: -D${var}=... is required")
  endif()
endforeach()

set(stage "${OUT_DIR}/stage")
file(REMOVE_RECURSE "${stage}" "${OUT_DIR}/moe_base")
file(MAKE_DIRECTORY "${stage}")
if(REV STREQUAL "")
  file(COPY "${SOURCE_DIR}/include/moe" DESTINATION "${stage}")
else()
  find_package(Git REQUIRED)
  execute_process(COMMAND "${GIT_EXECUTABLE}" -C "${SOURCE_DIR}" archive --format=tar -o "${OUT_DIR}/base.tar" "${REV}" include/moe
                  RESULT_VARIABLE failed ERROR_VARIABLE why)
  if(failed)
    message(FATAL_ERROR "base_headers.cmake: git archive of ${REV} failed: ${why}")
  endif()
  file(ARCHIVE_EXTRACT INPUT "${OUT_DIR}/base.tar" DESTINATION "${stage}")
  file(RENAME "${stage}/include/moe" "${stage}/moe")
endif()

# The renames, anchored so that names merely containing them stay (a header starts with a comment
# or a #pragma, so no rename is needed at a file's first character).
file(GLOB_RECURSE headers RELATIVE "${stage}/moe" "${stage}/moe/*.hpp")
foreach(header IN LISTS headers)
  file(READ "${stage}/moe/${header}" text)
  string(REGEX REPLACE "([^A-Za-z0-9_])MOE_" "\\1MOEBASE_" text "${text}")
  string(REGEX REPLACE "namespace moe([^A-Za-z0-9_])" "namespace moe_base\\1" text "${text}")
  string(REGEX REPLACE "([^A-Za-z0-9_])moe::" "\\1moe_base::" text "${text}")
  file(WRITE "${OUT_DIR}/moe_base/${header}" "${text}")
endforeach()
file(REMOVE_RECURSE "${stage}")
file(REMOVE "${OUT_DIR}/base.tar")
