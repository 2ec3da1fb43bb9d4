#pragma once
// A 64-bit fingerprint of a router's configuration (FNV-1a over its options' bits). A router
// stamps it on every routing it fills, and backward refuses a routing stamped by a router of
// another configuration: it would read that routing's buffers with its own strides.
#include <cstdint>
#include <cstring>
#include <sstream>
#include <string>
#include <type_traits>

#include "config.hpp"
#include "error.hpp"

MOE_NAMESPACE_BEGIN
namespace detail {

class Fingerprint {
 public:
  template <class V>
  Fingerprint& add(const V& value) noexcept {
    static_assert(std::is_arithmetic<V>::value || std::is_enum<V>::value, "Fingerprint: numbers and enums only");
    unsigned char bytes[sizeof(V)];
    std::memcpy(bytes, &value, sizeof(V));
    for (const unsigned char b : bytes) hash_ = (hash_ ^ b) * 0x100000001b3ULL;
    return *this;
  }
  std::uint64_t value() const noexcept { return hash_; }

 private:
  std::uint64_t hash_ = 0xcbf29ce484222325ULL;
};

// A fingerprint as every message shows it: "0x" and hex digits.
inline std::string fingerprint_text(std::uint64_t fingerprint) {
  std::ostringstream hex;
  hex << "0x" << std::hex << fingerprint;
  return hex.str();
}

// Throws unless a routing's stamp is this router's fingerprint.
inline void check_router_config(const char* where, const char* routing_name, std::uint64_t stamped, std::uint64_t mine) {
  if (stamped != mine) {
    throw_invalid(where, ": ", routing_name, " was filled by a router of another kind or configuration (options, experts ",
                  "or width), whose buffers this one would misread, or by no completed route (", routing_name,
                  "'s router fingerprint = ", fingerprint_text(stamped), ", this router's = ", fingerprint_text(mine), ")");
  }
}

}  // namespace detail
MOE_NAMESPACE_END
