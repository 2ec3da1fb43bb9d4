#include <catch2/catch.hpp>
#include <moe/moe.hpp>
