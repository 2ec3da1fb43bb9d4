// libFuzzer target: MoELayer<Router, SwiGLU<float>> (layer/moe_layer.hpp) on small shapes, with
// the top-k router (every option; forward, forward_train and backward), the expert-choice router
// and the hash router (forward), zero-computation experts, shared experts with and without a
// gate, both DroppedTokens policies, routing groups, token ids, and values that include NaN,
// ±Inf, ±1e30 and denormals.
//
// Checked: moe::invalid_argument exactly when an argument is outside its documented range (router
// options, shapes, groups, ids); moe::numeric_error only with check_finite on and values that are
// not moderate; the plan's structure; y against a per-token reference built from the plan (each
// expert run on the token's row alone, shared experts, pass-through) computed in double; y finite
// for moderate values; y bit-identical when y aliases x, with a warm workspace, with x and y
// rows not contiguous, and from forward_train; backward's dx and gradients finite for moderate
// values, and backward refusing a workspace from another batch.
#include <cmath>
#include <algorithm>
#include <cstdint>
#include <limits>
#include <memory>
#include <optional>
#include <type_traits>
#include <vector>

#include <moe/routing/expert_choice.hpp>
#include <moe/routing/hash.hpp>
#include <moe/routing/top_k.hpp>

#include <moe/experts/gated_feed_forward.hpp>
#include <moe/experts/zero_compute.hpp>
#include <moe/layer/moe_layer.hpp>

#include "fuzz_common.hpp"
#include "top_k_options.hpp"

namespace {

using namespace moe_fuzz;
using T = float;
using Expert = moe::SwiGLU<T>;
using Arch = moe::simd::default_arch;

struct Case {
  index_t num_ffn = 0, num_zero = 0, d = 0, ff = 0, T_ = 0;
  std::vector<Expert> experts;
  std::vector<moe::ZeroComputeExpert<T>> zero_compute;
  std::vector<Expert> shared;
  moe::Weight<T> shared_gate;
  moe::DroppedTokens dropped = moe::DroppedTokens::zero;
  moe::Matrix<T> x;
  Groups groups;
  std::vector<std::int64_t> ids;
  bool training = false;
  bool valid = true;     // every argument in its documented range
  bool moderate = true;  // every value finite with |v| <= kModerate
};

Expert make_expert(FuzzedDataProvider& fdp, index_t d, index_t ff, bool special, bool& moderate) {
  moe::Matrix<T> w_gate = matrix<T>(fdp, ff, d, special, moderate);  // [ff, d]
  moe::Matrix<T> w_up = matrix<T>(fdp, ff, d, special, moderate);    // [ff, d]
  moe::Matrix<T> w_down = matrix<T>(fdp, d, ff, special, moderate);  // [d, ff]
  return Expert(std::move(w_gate), std::move(w_up), std::move(w_down));
}

// y_ref[t] = Σ_a w_a · expert_a(x[t]) + Σ_s g(x[t]) · shared_s(x[t]) + (lost weight) · x[t], in
// double from each expert run on the token's row alone; returns false where y differs by more than
// rounding, relative to the sum of the terms' magnitudes.
template <class Router>
bool matches_reference(const moe::MoELayer<Router, Expert>& layer, const Case& c, const moe::Routing<T>& plan,
                       const moe::ConstMatrixRef<T>& y) {
  const index_t d = c.d;
  const auto num_ffn = static_cast<index_t>(layer.experts().size());
  std::vector<T> row(sz(d)), out(sz(d)), scratch(64);  // scratch_size(1) = d_ff <= 32
  std::vector<double> ref(sz(d)), magnitude(sz(d)), slack(sz(d));
  std::vector<double> lost(sz(c.T_), 0.0);
  if (c.dropped == moe::DroppedTokens::pass_through)
    for (std::size_t i = 0; i < plan.dropped.size(); ++i) lost[sz(plan.dropped[i])] = static_cast<double>(plan.dropped_weight[i]);
  for (index_t t = 0; t < c.T_; ++t) {
    for (index_t i = 0; i < d; ++i) row[sz(i)] = c.x(t, i);
    std::fill(ref.begin(), ref.end(), 0.0);
    std::fill(magnitude.begin(), magnitude.end(), 0.0);
    std::fill(slack.begin(), slack.end(), 0.0);
    // slack: error beyond rounding. A weight or gate computed in float is off by up to its denormal
    // spacing when it underflows.
    const double denormal = static_cast<double>(std::numeric_limits<T>::denorm_min());
    auto add = [&](double w) {
      for (index_t i = 0; i < d; ++i) {
        ref[sz(i)] += w * static_cast<double>(out[sz(i)]);
        magnitude[sz(i)] += std::fabs(w * static_cast<double>(out[sz(i)]));
        slack[sz(i)] += denormal * std::fabs(static_cast<double>(out[sz(i)]));
      }
    };
    for (const Choice<T>& ch : choices_of(plan, t)) {
      if (ch.expert < num_ffn) {
        layer.experts()[sz(ch.expert)].forward(Arch{}, row.data(), 1, out.data(), scratch.data());
      } else {
        layer.zero_compute_experts()[sz(ch.expert - num_ffn)].forward(Arch{}, row.data(), 1, out.data());
      }
      add(static_cast<double>(ch.weight));
    }
    double gate = 1, gate_error = 0;
    if (c.shared_gate.rows() == 1) {
      double z = 0, z_magnitude = 0;
      for (index_t i = 0; i < d; ++i) {
        const double term = static_cast<double>(c.x(t, i)) * static_cast<double>(c.shared_gate.data()[i]);
        z += term;
        z_magnitude += std::fabs(term);
      }
      auto sigmoid = [](double v) { return v < 0 ? std::exp(v) / (1 + std::exp(v)) : 1 / (1 + std::exp(-v)); };
      gate = sigmoid(z);
      // The layer sums z in float: off by up to about (d + 2)·eps·Σ|terms|, which moves the gate
      // by up to σ(z ± that) − σ(z), far more than rounding when the terms cancel. Where a term or
      // a partial sum can overflow float, the float z (±inf, NaN) says nothing: any gate in [0, 1].
      const double z_error = static_cast<double>(d + 2) * static_cast<double>(std::numeric_limits<T>::epsilon()) * z_magnitude;
      gate_error = std::max(std::fabs(sigmoid(z + z_error) - gate), std::fabs(sigmoid(z - z_error) - gate));
      if (!(z_magnitude < 0.5 * static_cast<double>(std::numeric_limits<T>::max()))) gate_error = 1;
    }
    for (const Expert& s : layer.shared_experts()) {
      s.forward(Arch{}, row.data(), 1, out.data(), scratch.data());
      add(gate);
      // The term may be as large as gate_error · |out|: the float sum's rounding scales with that too.
      for (index_t i = 0; i < d; ++i) {
        slack[sz(i)] += gate_error * std::fabs(static_cast<double>(out[sz(i)]));
        magnitude[sz(i)] += gate_error * std::fabs(static_cast<double>(out[sz(i)]));
      }
    }
    out = row;
    add(lost[sz(t)]);
    for (index_t i = 0; i < d; ++i) {
      // Sums that overflow (or nearly overflow) float may legitimately be inf in y.
      if (!(magnitude[sz(i)] < 1e-3 * static_cast<double>(std::numeric_limits<T>::max()))) continue;
      if (std::fabs(static_cast<double>(y(t, i)) - ref[sz(i)]) > 1e-4 * magnitude[sz(i)] + slack[sz(i)] + 1e-30) {
        std::fprintf(stderr, "y(%td, %td) = %a, reference %a (terms' magnitude %a)\n", t, i, static_cast<double>(y(t, i)),
                     ref[sz(i)], magnitude[sz(i)]);
        return false;
      }
    }
  }
  return true;
}

// Builds the layer around `router` (empty when its constructor threw) and checks forward, a warm
// repeat in place and, for top-k, backward.
template <class Router>
void exercise(FuzzedDataProvider& fdp, Case& c, std::optional<Router>& router, bool router_valid) {
  std::optional<moe::MoELayer<Router, Expert>> layer;
  moe::Workspace<T> ws;
  moe::Matrix<T> y(c.T_, c.d);
  moe::RouteContext ctx;
  try {
    if (!router) {  // the router's constructor threw
      MOE_FUZZ_CHECK(!router_valid);
      return;
    }
    layer.emplace(*router, c.experts, c.zero_compute);
    layer->set_shared_experts(c.shared, c.shared_gate);
    layer->set_dropped_tokens(c.dropped);
    ctx = context(c.groups, c.ids);
    ctx.training = c.training;
    layer->forward(c.x, ctx, y, ws);
  } catch (const moe::invalid_argument&) {
    MOE_FUZZ_CHECK(!(router_valid && c.valid));
    return;
  } catch (const moe::numeric_error& e) {
    // Moderate values throw only for a top-k routing weight beyond T's range (a rerouted choice:
    // the top_k_router target checks when).
    MOE_FUZZ_CHECK(router_valid && c.valid &&
                   (!c.moderate || std::string(e.what()).find("routing weight is beyond") != std::string::npos));
    return;
  }
  MOE_FUZZ_CHECK(router_valid && c.valid);

  const moe::Routing<T>& plan = ws.routing.plan;
  check_plan(plan, c.T_, c.num_ffn + c.num_zero);
  bool weights_finite = true;
  for (const T w : plan.weight) weights_finite = weights_finite && std::isfinite(w);
  for (const T w : plan.dropped_weight) weights_finite = weights_finite && std::isfinite(w);
  // A top-k router with check_finite gives finite weights or throws; without it, a rerouted weight
  // beyond T's range is infinite, and the layer must still not crash.
  if constexpr (std::is_same<Router, moe::TopKRouter<T>>::value) {
    if (router->options().check_finite) MOE_FUZZ_CHECK(weights_finite);
  }
  if (c.moderate && weights_finite) MOE_FUZZ_CHECK(all_finite(y));
  if (all_finite(c.x)) MOE_FUZZ_CHECK(matches_reference(*layer, c, plan, y));

  // y may alias x; a warm workspace gives the same bits.
  moe::Matrix<T> inout = c.x;
  layer->forward(inout, ctx, inout, ws);
  MOE_FUZZ_CHECK(same_bits(inout, y));
  // So do x and y rows that are not contiguous (the shared experts then read a copy of x), in place.
  // (Not for an empty batch: Eigen's column blocks of an empty matrix offset a null pointer.)
  if (c.T_ > 0) {
    moe::Matrix<T> wide = moe::Matrix<T>::Constant(c.T_, c.d + 3, T(-7));
    wide.leftCols(c.d) = c.x;
    moe::MatrixRef<T> strided = wide.leftCols(c.d);
    layer->forward(strided, ctx, strided, ws);
    MOE_FUZZ_CHECK(same_bits(moe::Matrix<T>(strided), y));
    MOE_FUZZ_CHECK((wide.rightCols(3).array() == T(-7)).all());
  }

  if constexpr (std::is_same<Router, moe::TopKRouter<T>>::value) {
    moe::TrainingWorkspace<T> tws;
    moe::Matrix<T> y_train(c.T_, c.d);
    layer->forward_train(c.x, ctx, y_train, tws);
    MOE_FUZZ_CHECK(same_bits(y_train, y));
    bool moderate_dy = true;
    const moe::Matrix<T> dy = matrix<T>(fdp, c.T_, c.d, !c.moderate, moderate_dy);
    moe::Matrix<T> extra;  // [T, E] an auxiliary loss's gradient, sometimes
    if (fdp.ConsumeBool()) extra = matrix<T>(fdp, c.T_, layer->num_experts(), false, moderate_dy);
    auto grads = layer->make_gradients();
    moe::Matrix<T> dx(c.T_, c.d);
    layer->backward(c.x, dy, dx, grads, tws, extra.size() > 0 ? extra.data() : nullptr);
    if (c.moderate && moderate_dy && weights_finite) {
      MOE_FUZZ_CHECK(all_finite(dx));
      MOE_FUZZ_CHECK(all_finite(grads.router));
      for (const auto& g : grads.experts) g.for_each([](const auto& m) { MOE_FUZZ_CHECK(all_finite(m)); });
      for (const auto& g : grads.shared) g.for_each([](const auto& m) { MOE_FUZZ_CHECK(all_finite(m)); });
      for (const auto& g : grads.zero_compute) g.for_each([](const auto& m) { MOE_FUZZ_CHECK(all_finite(m)); });
      MOE_FUZZ_CHECK(all_finite(grads.shared_gate));
    }
    // A workspace from another batch is refused.
    if (c.T_ > 0) {
      bool threw = false;
      try {
        moe::Matrix<T> dx_short(c.T_ - 1, c.d);
        layer->backward(c.x.topRows(c.T_ - 1), dy.topRows(c.T_ - 1), dx_short, grads, tws);
      } catch (const moe::invalid_argument&) {
        threw = true;
      }
      MOE_FUZZ_CHECK(threw);
    }
  }
}

void run(FuzzedDataProvider& fdp) {
  Case c;
  const int kind = fdp.ConsumeIntegralInRange<int>(0, 3);  // 0, 1: top-k; 2: expert choice; 3: hash
  c.num_ffn = size_in(fdp, 1, 8);
  c.num_zero = fdp.ConsumeIntegralInRange<int>(0, 3) == 0 ? fdp.ConsumeIntegralInRange<index_t>(1, 3) : 0;
  c.d = size_in(fdp, 1, 48);
  c.ff = size_in(fdp, 1, 32);
  c.T_ = size_in(fdp, 0, 64);
  const index_t E = c.num_ffn + c.num_zero;
  const bool special_weights = fdp.ConsumeIntegralInRange<int>(0, 7) == 0;
  const bool special_x = fdp.ConsumeIntegralInRange<int>(0, 7) == 0;

  for (index_t e = 0; e < c.num_ffn; ++e) c.experts.push_back(make_expert(fdp, c.d, c.ff, special_weights, c.moderate));
  for (index_t z = 0; z < c.num_zero; ++z) {
    switch (fdp.ConsumeIntegralInRange<int>(0, 3)) {
      case 0: c.zero_compute.push_back(moe::ZeroComputeExpert<T>::zero(c.d)); break;
      case 1: c.zero_compute.push_back(moe::ZeroComputeExpert<T>::copy(c.d)); break;
      case 2: {
        moe::Vector<T> value(c.d);
        fill(fdp, value.data(), c.d, special_weights, c.moderate);
        c.zero_compute.push_back(moe::ZeroComputeExpert<T>::constant(value));
        break;
      }
      default: {
        moe::Vector<T> value(c.d);
        fill(fdp, value.data(), c.d, special_weights, c.moderate);
        moe::Matrix<T> mix = matrix<T>(fdp, 2, c.d, special_weights, c.moderate);  // [2, d]
        c.zero_compute.push_back(moe::ZeroComputeExpert<T>::constant(value, mix));
        break;
      }
    }
  }
  const index_t num_shared = fdp.ConsumeIntegralInRange<int>(0, 2) == 0 ? fdp.ConsumeIntegralInRange<index_t>(1, 2) : 0;
  const index_t shared_ff = size_in(fdp, 1, 16);
  for (index_t s = 0; s < num_shared; ++s) c.shared.push_back(make_expert(fdp, c.d, shared_ff, special_weights, c.moderate));
  if (num_shared > 0 && fdp.ConsumeBool()) c.shared_gate = moe::Weight<T>::own(matrix<T>(fdp, 1, c.d, special_weights, c.moderate));
  c.dropped = fdp.ConsumeBool() ? moe::DroppedTokens::pass_through : moe::DroppedTokens::zero;
  c.x = matrix<T>(fdp, c.T_, c.d, special_x, c.moderate);
  c.groups = groups(fdp, c.T_);
  c.ids = token_ids(fdp, c.T_);
  c.training = fdp.ConsumeBool();
  if (c.groups.invalid) c.valid = false;

  char text[300];
  if (kind <= 1) {
    const TopKOptions o = decode_options(fdp, E, c.T_);
    bool router_valid = options_valid<T>(o, E);
    if (c.T_ > 0 && c.training && o.jitter > 0 && c.ids.empty()) c.valid = false;
    if (!(std::fabs(o.scale) <= kModerate)) c.moderate = false;
    const moe::Matrix<T> w = matrix<T>(fdp, E, c.d, special_weights, c.moderate);  // [E, d]
    std::snprintf(text, sizeof text,
                  "top-k E=%td+%td d=%td ff=%td T=%td k=%td score=%d placement=%d normalize=%d scale=%g groups=%td/%td "
                  "top_p=%g cf=%g fixed=%td overflow=%d renorm=%d jitter=%g shared=%td gate=%d dropped=%d moderate=%d",
                  c.num_ffn, c.num_zero, c.d, c.ff, c.T_, o.k, int(o.score), int(o.softmax_placement), int(o.normalize), o.scale,
                  o.selected_groups, o.expert_groups, o.top_p, o.capacity_factor, o.fixed_capacity, int(o.overflow),
                  int(o.renormalize_after_drop), o.jitter, num_shared, int(c.shared_gate.rows()), int(c.dropped), int(c.moderate));
    case_description() = text;
    std::optional<moe::TopKRouter<T>> router;
    try {
      router.emplace(w, o);
    } catch (const moe::invalid_argument&) {
    }
    exercise(fdp, c, router, router_valid);
  } else if (kind == 2) {
    moe::ExpertChoiceOptions o;
    o.capacity_factor = pick(fdp, {1.0, 2.0, 0.5, 4.0, 0.25, 1e-300, 1e300, 0.0, kNaN});
    o.check_finite = fdp.ConsumeIntegralInRange<int>(0, 7) != 0;
    const bool router_valid = std::isfinite(o.capacity_factor) && o.capacity_factor > 0;
    const moe::Matrix<T> w = matrix<T>(fdp, E, c.d, special_weights, c.moderate);  // [E, d]
    std::snprintf(text, sizeof text, "expert-choice E=%td+%td d=%td ff=%td T=%td cf=%g shared=%td gate=%d dropped=%d moderate=%d",
                  c.num_ffn, c.num_zero, c.d, c.ff, c.T_, o.capacity_factor, num_shared, int(c.shared_gate.rows()),
                  int(c.dropped), int(c.moderate));
    case_description() = text;
    std::optional<moe::ExpertChoiceRouter<T>> router;
    try {
      router.emplace(w, o);
    } catch (const moe::invalid_argument&) {
    }
    exercise(fdp, c, router, router_valid);
  } else {
    moe::HashOptions o;
    o.k = index_in(fdp, 1, std::min<index_t>(E, 4));
    o.seed = fdp.ConsumeIntegral<std::uint64_t>();
    const bool router_valid = o.k >= 1 && o.k <= E;
    if (c.T_ > 0 && c.ids.empty()) c.valid = false;
    std::snprintf(text, sizeof text, "hash E=%td+%td d=%td ff=%td T=%td k=%td shared=%td gate=%d dropped=%d moderate=%d", c.num_ffn,
                  c.num_zero, c.d, c.ff, c.T_, o.k, num_shared, int(c.shared_gate.rows()), int(c.dropped), int(c.moderate));
    case_description() = text;
    std::optional<moe::HashRouter<T>> router;
    try {
      router.emplace(E, c.d, o);
    } catch (const moe::invalid_argument&) {
    }
    exercise(fdp, c, router, router_valid);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  FuzzedDataProvider fdp(data, size);
  run(fdp);
  return 0;
}
