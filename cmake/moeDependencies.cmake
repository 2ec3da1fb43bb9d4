# Finds moe's dependencies; used by the build and by the installed moeConfig.cmake.
include(CMakeFindDependencyMacro)

if(NOT TARGET Eigen3::Eigen)
  find_dependency(Eigen3 3.3 NO_MODULE)
endif()

# Debian's xsimd 8.1 export names an `xtl` link target whose package is not installed; xsimd does
# not need it to compile, so stand in an empty target when there is none.
if(NOT TARGET xtl)
  add_library(xtl INTERFACE IMPORTED)
endif()
# xsimd's version file accepts any newer version, but moe is written against xsimd 8's API
# (xsimd::hadd, removed in xsimd 9): a newer one is refused here rather than deep in a header.
if(NOT TARGET xsimd)
  find_dependency(xsimd 8.1)
  if(xsimd_VERSION VERSION_GREATER_EQUAL 9)
    message(FATAL_ERROR "moe needs xsimd 8.x (8.1 or later within 8); found xsimd ${xsimd_VERSION} in ${xsimd_DIR}")
  endif()
endif()

# Optional: enables the moe::openmp target.
if(NOT TARGET OpenMP::OpenMP_CXX)
  find_package(OpenMP QUIET COMPONENTS CXX)
endif()
