#pragma once
// Library version; CMake parses these three lines for the package version file.
#define MOE_VERSION_MAJOR 0
#define MOE_VERSION_MINOR 1
#define MOE_VERSION_PATCH 0
