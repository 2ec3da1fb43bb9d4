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
if(NOT TARGET xsimd)
  find_dependency(xsimd)
endif()

# Optional: enables the moe::openmp target.
if(NOT TARGET OpenMP::OpenMP_CXX)
  find_package(OpenMP QUIET COMPONENTS CXX)
endif()
