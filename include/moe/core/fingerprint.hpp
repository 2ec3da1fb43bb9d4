#pragma once
// A 64-bit fingerprint of a router's configuration (FNV-1a over its options' bits). A router
// stamps it on every routing it fills, and backward refuses a routing stamped by a router of
// another configuration: it would read that routing's buffers with its own strides.
#include <cstdint>
#include <cstring>
#include <sstream>
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

// Throws unless a routing's stamp is this router's fingerprint.
inline void check_router_config(const char* where, const char* routing_name, std::uint64_t stamped, std::uint64_t mine) {
  if (stamped != mine) {
    std::ostringstream hex;
    hex << std::hex << "(" << routing_name << "'s router fingerprint = 0x" << stamped << ", this router's = 0x" << mine << ")";
    throw_invalid(where, ": ", routing_name, " was filled by a router of another kind or configuration (options, experts ",
                  "or width), whose buffers this one would misread, or by no completed route ", hex.str());
  }
}

}  // namespace detail
MOE_NAMESPACE_END
