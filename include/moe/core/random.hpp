#pragma once
// Counter-based random numbers: a pure function of a key, so a token's noise or hash depends on
// what the token is, never on where it sits in a batch or on what ran before.
#include <cstdint>

#include "config.hpp"

MOE_NAMESPACE_BEGIN

// SplitMix64 finalizer (Steele, Lea and Flood 2014): a bijective 64-bit mix with full avalanche.
constexpr std::uint64_t mix64(std::uint64_t z) noexcept {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Mixes several words into one key; order matters.
constexpr std::uint64_t mix64(std::uint64_t a, std::uint64_t b) noexcept { return mix64(mix64(a) ^ b); }
constexpr std::uint64_t mix64(std::uint64_t a, std::uint64_t b, std::uint64_t c) noexcept { return mix64(mix64(a, b) ^ c); }
constexpr std::uint64_t mix64(std::uint64_t a, std::uint64_t b, std::uint64_t c, std::uint64_t d) noexcept {
  return mix64(mix64(a, b, c) ^ d);
}

// Uniform double in [0, 1) from the top 53 bits of a mixed key.
constexpr double unit_double(std::uint64_t bits) noexcept { return static_cast<double>(bits >> 11) * 0x1.0p-53; }

MOE_NAMESPACE_END
