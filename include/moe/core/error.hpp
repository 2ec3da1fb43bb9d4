#pragma once
// Exceptions and argument checks. Messages name the component, the parameter and the values:
//   "moe::TopKRouter: k must satisfy 1 <= k <= num_experts (k = 0, num_experts = 8)"
#include <charconv>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

#include "config.hpp"

MOE_NAMESPACE_BEGIN

// A caller passed something the API does not accept (shape, range, option).
class invalid_argument : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

// A value is not finite where a finite value is required (logits, scores).
class numeric_error : public std::domain_error {
 public:
  using std::domain_error::domain_error;
};

namespace detail {

// Floating-point values print in their shortest form that reads back to the same value (an
// ostream's 6 digits showed a top_p of 1.0000001 as 1, inside the range the message names).
template <class Part>
void append(std::ostringstream& out, const Part& part) {
  if constexpr (std::is_floating_point<Part>::value) {
    char text[64];
    const auto result = std::to_chars(text, text + sizeof(text), part);
    out.write(text, result.ptr - text);
  } else {
    out << part;
  }
}

template <class... Parts>
std::string concat(const Parts&... parts) {
  std::ostringstream out;
  (append(out, parts), ...);
  return out.str();
}

template <class... Parts>
[[noreturn]] void throw_invalid(const Parts&... parts) {
  MOE_THROW(::moe::invalid_argument(concat("moe::", parts...)));
}

template <class... Parts>
[[noreturn]] void throw_numeric(const Parts&... parts) {
  MOE_THROW(::moe::numeric_error(concat("moe::", parts...)));
}

// Checks that `actual == expected` for a named dimension, e.g.
//   check_dim("MoELayer::forward", "x.cols()", x.cols(), "d", d)
//   -> "moe::MoELayer::forward: x.cols() must equal d (x.cols() = 7, d = 8)"
template <class A, class B>
void check_dim(const char* where, const char* actual_name, const A& actual, const char* expected_name,
               const B& expected) {
  if (actual != expected) {
    throw_invalid(where, ": ", actual_name, " must equal ", expected_name, " (", actual_name, " = ", actual, ", ",
                  expected_name, " = ", expected, ")");
  }
}

// Checks that a dimension has a fixed value, e.g.
//   check_value("MoELayer::set_shared_experts", "gate.rows()", gate.rows(), 1)
//   -> "moe::MoELayer::set_shared_experts: gate.rows() must be 1 (gate.rows() = 2)"
template <class A, class B>
void check_value(const char* where, const char* actual_name, const A& actual, const B& expected) {
  if (actual != expected) throw_invalid(where, ": ", actual_name, " must be ", expected, " (", actual_name, " = ", actual, ")");
}

// Checks that a width (d_model, d_ff) is at least 1: a zero width is a model's shape gone wrong,
// e.g. check_positive("FeedForward", "w_in.rows() (d_ff)", 0)
//   -> "moe::FeedForward: w_in.rows() (d_ff) must be at least 1 (w_in.rows() (d_ff) = 0)"
template <class A>
void check_positive(const char* where, const char* name, const A& value) {
  if (!(value >= 1)) throw_invalid(where, ": ", name, " must be at least 1 (", name, " = ", value, ")");
}

// Whether a double option converts to a finite T: |value| at most T's largest (NaN fails). The
// comparison is in double, before any conversion: converted, a value beyond float's range would
// already be inf (or float's largest, within half an ulp of it).
template <class T>
bool finite_in(double value) {
  return std::abs(value) <= static_cast<double>(std::numeric_limits<T>::max());
}

// Checks that a double option is finite in the scalar type T, e.g.
//   check_finite_in<float>("TopKRouter", "scale", 1e39)
//   -> "moe::TopKRouter: scale must be finite in the scalar type (scale = 1e+39, largest = 3.4028235e+38)"
template <class T>
void check_finite_in(const char* where, const char* name, double value) {
  if (!finite_in<T>(value)) {
    throw_invalid(where, ": ", name, " must be finite in the scalar type (", name, " = ", value, ", largest = ",
                  std::numeric_limits<T>::max(), ")");
  }
}

// The names of an enum option's values, in order from 0, specialized beside each enum: what
// check_enum accepts and lists.
template <class Enum>
struct EnumNames;

// Checks that an enum option holds one of its named values (one cast from an integer may hold
// any other, which the code would take for one of them), e.g.
//   check_enum("TopKRouter", "score", static_cast<ScoreFunction>(7))
//   -> "moe::TopKRouter: score must be softmax or sigmoid (score = 7)"
template <class Enum>
void check_enum(const char* where, const char* name, Enum value) {
  const auto& names = EnumNames<Enum>::names;
  const auto count = static_cast<long long>(sizeof(names) / sizeof(names[0]));
  const auto number = static_cast<long long>(value);
  if (number >= 0 && number < count) return;
  std::string listed;
  for (long long i = 0; i < count; ++i) listed += concat(i == 0 ? "" : i + 1 == count ? " or " : ", ", names[i]);
  throw_invalid(where, ": ", name, " must be ", listed, " (", name, " = ", number, ")");
}

// Checks that a matrix's rows lie as moe's kernels walk them: at increasing addresses
// (outerStride() >= 0: the kernels step from row to row with unsigned strides) and, for a matrix
// the call writes, apart (outerStride() >= cols(): overlapping rows cannot hold a result), e.g.
//   check_rows("MoELayer::forward", "y", y, true)
//   -> "moe::MoELayer::forward: y's rows must not overlap, and lie at increasing addresses
//       (y.outerStride() = -8, y.cols() = 8)"
template <class M>
void check_rows(const char* where, const char* name, const M& m, bool written) {
  if (m.rows() < 2 || m.cols() == 0) return;  // no second row to step to
  if (written && m.outerStride() < m.cols()) {
    throw_invalid(where, ": ", name, "'s rows must not overlap, and lie at increasing addresses (", name,
                  ".outerStride() = ", m.outerStride(), ", ", name, ".cols() = ", m.cols(), ")");
  }
  if (m.outerStride() < 0) {
    throw_invalid(where, ": ", name, "'s rows must lie at increasing addresses (", name, ".outerStride() = ", m.outerStride(), ")");
  }
}

// Throws moe::numeric_error naming the first non-finite logit of rows [begin, end), in token order,
// e.g. "moe::TopKRouter::route: logit is not finite (token = 3, expert = 0, logit = inf)". The
// losses call it before writing any gradient row, so grad is untouched when they throw; the
// routers once a vector test (simd::all_finite) has found one.
template <class M>
void check_finite_logits(const char* where, const M& logits, std::ptrdiff_t begin, std::ptrdiff_t end) {
  for (std::ptrdiff_t t = begin; t < end; ++t) {
    for (std::ptrdiff_t e = 0; e < logits.cols(); ++e) {
      const double z = static_cast<double>(logits(t, e));
      if (!std::isfinite(z))
        throw_numeric(where, ": logit is not finite (token = ", t, ", expert = ", e, ", logit = ", z, ")");
    }
  }
}

// Checks that `out`, which a call writes, shares no element with `in`, which it reads after
// writing `out` (row-major matrices, rows outerStride() apart), e.g. a backward's dx and dy. Rows
// are compared, not whole address spans: dx and x side by side as the columns of one wider buffer
// interleave their rows and share nothing.
template <class Out, class In>
void check_disjoint(const char* where, const char* out_name, const Out& out, const char* in_name, const In& in) {
  check_rows(where, out_name, out, true);  // what the walk below relies on
  check_rows(where, in_name, in, false);
  using Address = std::uintptr_t;
  auto row = [](const auto& m, auto r) {  // [first, last) byte addresses of row r
    const auto first = reinterpret_cast<Address>(m.data() + r * m.outerStride());
    return std::make_pair(first, first + static_cast<Address>(m.cols()) * sizeof(*m.data()));
  };
  bool shared = false;
  if (out.cols() > 0 && in.cols() > 0) {
    // Both matrices' rows lie in increasing address order: step past whichever row ends first.
    for (decltype(out.rows()) i = 0, j = 0; !shared && i < out.rows() && j < in.rows();) {
      const auto a = row(out, i), b = row(in, j);
      shared = a.first < b.second && b.first < a.second;
      if (a.second <= b.first) ++i;
      else ++j;
    }
  }
  if (shared) {
    throw_invalid(where, ": ", out_name, " must not share memory with ", in_name, ", which is read after ", out_name,
                  " is written (", out_name, ".data() = ", static_cast<const void*>(out.data()), ", ", in_name,
                  ".data() = ", static_cast<const void*>(in.data()), ")");
  }
}

// What a layer's backward checks before it writes anything: that the workspace holds a
// forward_train of `training_tokens` tokens (-1: none) on this x, the shapes of x, dy and dx
// against the layer's width d, and that dx is neither x's nor dy's memory.
template <class X, class DY, class DX, class Index>
void check_backward_inputs(const char* where, Index training_tokens, Index d, const X& x, const DY& dy, const DX& dx) {
  if (training_tokens != x.rows()) {
    throw_invalid(where, ": needs the workspace of a forward_train on the same x, with no other forward since ",
                  "(workspace tokens = ", training_tokens, ", x.rows() = ", x.rows(), ")");
  }
  check_dim(where, "x.cols()", x.cols(), "d_model", d);
  check_dim(where, "dy.rows()", dy.rows(), "x.rows()", x.rows());
  check_dim(where, "dy.cols()", dy.cols(), "d_model", d);
  check_dim(where, "dx.rows()", dx.rows(), "x.rows()", x.rows());
  check_dim(where, "dx.cols()", dx.cols(), "d_model", d);
  check_disjoint(where, "dx", dx, "x", x);
  check_disjoint(where, "dx", dx, "dy", dy);
}

}  // namespace detail

MOE_NAMESPACE_END
