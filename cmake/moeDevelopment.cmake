# Settings for moe's own tests, benchmarks and examples (never for the library's users).

# moe_project_options: warnings (as errors by default) and, optionally, -march=native.
add_library(moe_project_options INTERFACE)
if(CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
  target_compile_options(moe_project_options INTERFACE
    -Wall -Wextra -Wpedantic -Wshadow -Wconversion -Wnon-virtual-dtor -Wold-style-cast -Wcast-align
    -Wnull-dereference -Wdouble-promotion)
  # (clang's -Wconversion also implies -Wsign-conversion, g++'s does not: the clang builds keep the
  # headers clean for users who compile with clang's -Wconversion.)
  if(MOE_WERROR)
    target_compile_options(moe_project_options INTERFACE -Werror)
  endif()
  if(MOE_NATIVE)
    target_compile_options(moe_project_options INTERFACE -march=native)
  endif()
endif()

# moe_add_program(name source... [OPENMP]): an executable of ours linked to moe.
function(moe_add_program name)
  cmake_parse_arguments(arg "OPENMP" "" "" ${ARGN})
  add_executable(${name} ${arg_UNPARSED_ARGUMENTS})
  if(arg_OPENMP AND TARGET moe::openmp)
    target_link_libraries(${name} PRIVATE moe::openmp moe_project_options)
  else()
    target_link_libraries(${name} PRIVATE moe::moe moe_project_options)
  endif()
endfunction()
