// Determinism under batch permutation: for routers without cross-token dependence (top-k without
// capacity, in every scoring/selection variant, and hash routing), permuting the tokens of a batch
// permutes the rows of y and of dx bit for bit. (Routers with capacity, expert-choice and soft
// routing do depend on the other tokens; tests/security/isolation_test.cpp covers them with
// routing groups.) dx too, with training jitter and through shared experts: every matrix product on
// its path is simd::matmul_nn or simd::matmul_nt, which sum each element in one order whatever the batch.
#include <catch2/catch.hpp>

#include <algorithm>
#include <numeric>
#include <random>
#include <vector>

#include "../support/reference.hpp"

// (A namespace of its own: this file may share a translation unit with other test files.)
namespace determinism_test {

using namespace moe_test;

namespace {

constexpr index_t kD = 24, kFF = 40, kE = 8, kT = 61;

std::vector<moe::SwiGLU<float>> make_experts(index_t n) {
  std::vector<moe::SwiGLU<float>> out;
  for (index_t e = 0; e < n; ++e) {
    const auto s = 100 + 3 * static_cast<std::uint32_t>(e);
    out.emplace_back(random_matrix<float>(kFF, kD, s, 0.2), random_matrix<float>(kFF, kD, s + 1, 0.2),
                     random_matrix<float>(kD, kFF, s + 2, 0.2));
  }
  return out;
}

// rows[i] of the result = m.row(perm[i])
moe::Matrix<float> permute_rows(const moe::Matrix<float>& m, const std::vector<index_t>& perm) {
  moe::Matrix<float> out(m.rows(), m.cols());
  for (std::size_t i = 0; i < perm.size(); ++i) out.row(static_cast<index_t>(i)) = m.row(perm[i]);
  return out;
}

std::vector<index_t> random_permutation(index_t n, std::uint32_t seed) {
  std::vector<index_t> perm(static_cast<std::size_t>(n));
  std::iota(perm.begin(), perm.end(), index_t(0));
  std::mt19937 rng(seed);
  std::shuffle(perm.begin(), perm.end(), rng);
  return perm;
}

// forward_train and backward on x and on a permuted x with permuted token ids: y and dx are the
// permuted y and dx, bit for bit.
template <class Layer>
void check_permutation(const Layer& layer, bool train, std::uint32_t seed) {
  const moe::Matrix<float> x = random_matrix<float>(kT, kD, seed), dy = random_matrix<float>(kT, kD, seed + 1);
  std::vector<std::int64_t> ids(static_cast<std::size_t>(kT));
  for (std::size_t t = 0; t < ids.size(); ++t) ids[t] = static_cast<std::int64_t>((t * 7919) % 1000);
  moe::RouteContext ctx;
  ctx.token_ids = ids.data();
  ctx.training = train;

  moe::TrainingWorkspace<float> ws;
  moe::Matrix<float> y(kT, kD), dx(kT, kD);
  layer.forward_train(x, ctx, y, ws);
  auto grads = layer.make_gradients();
  layer.backward(x, dy, dx, grads, ws);

  for (const std::uint32_t trial : {1u, 2u, 3u}) {
    const std::vector<index_t> perm = random_permutation(kT, seed * 10 + trial);
    std::vector<std::int64_t> pids(ids.size());
    for (std::size_t i = 0; i < perm.size(); ++i) pids[i] = ids[static_cast<std::size_t>(perm[i])];
    moe::RouteContext pctx = ctx;
    pctx.token_ids = pids.data();
    const moe::Matrix<float> px = permute_rows(x, perm), pdy = permute_rows(dy, perm);
    moe::TrainingWorkspace<float> pws;
    moe::Matrix<float> py(kT, kD), pdx(kT, kD);
    layer.forward_train(px, pctx, py, pws);
    auto pgrads = layer.make_gradients();
    layer.backward(px, pdy, pdx, pgrads, pws);
    CAPTURE(trial);
    REQUIRE(py == permute_rows(y, perm));
    REQUIRE(pdx == permute_rows(dx, perm));
    // The plain forward, on a workspace warmed by another batch, agrees too.
    moe::Workspace<float> plain;
    const std::vector<std::int64_t> other_ids(static_cast<std::size_t>(kT + 9), 3);
    moe::RouteContext other;
    other.token_ids = other_ids.data();
    moe::Matrix<float> other_y(kT + 9, kD);
    layer.forward(random_matrix<float>(kT + 9, kD, 5), other, other_y, plain);
    moe::Matrix<float> py2(kT, kD);
    layer.forward(px, pctx, py2, plain);
    REQUIRE(py2 == py);
  }
}

moe::Matrix<float> router_weight() { return random_matrix<float>(kE, kD, 7, 1.5); }

}  // namespace

TEST_CASE("Dropless top-k: a permuted batch gives permuted outputs and dx, bit for bit", "[determinism][permutation]") {
  struct Variant {
    const char* name;
    moe::TopKOptions options;
  };
  moe::TopKOptions softmax_norm = moe::presets::mixtral(2);
  moe::TopKOptions sigmoid_groups = moe::presets::deepseek_v3(2, 4, 2, 2.5);
  moe::TopKOptions after;
  after.k = 3;
  after.softmax_placement = moe::SoftmaxPlacement::after_top_k;
  moe::TopKOptions top_p;
  top_p.k = 4;
  top_p.top_p = 0.6;
  moe::TopKOptions jitter = moe::presets::mixtral(2);
  jitter.jitter = 0.05;  // keyed by token id, so it permutes with the ids
  const std::vector<Variant> variants = {{"softmax, normalized (Mixtral)", softmax_norm},
                                         {"sigmoid, group-limited, scaled (DeepSeek-V3)", sigmoid_groups},
                                         {"softmax after top-k (Megatron)", after},
                                         {"dynamic top-p", top_p},
                                         {"training jitter", jitter}};
  std::uint32_t seed = 11;
  for (const Variant& v : variants) {
    CAPTURE(v.name);
    moe::TopKRouter<float> router(router_weight(), v.options);
    if (v.options.score == moe::ScoreFunction::sigmoid) router.set_selection_bias(moe::Vector<float>::LinSpaced(kE, -0.2f, 0.3f));
    moe::MoELayer layer(router, make_experts(kE - 1), {moe::ZeroComputeExpert<float>::copy(kD)});
    check_permutation(layer, v.options.jitter > 0, seed++);
  }
}

TEST_CASE("Shared experts with a sigmoid gate: a permuted batch gives permuted outputs and dx, bit for bit",
          "[determinism][permutation][shared]") {
  moe::MoELayer layer(moe::TopKRouter<float>(router_weight(), moe::presets::qwen2_moe(2, true)), make_experts(kE));
  layer.set_shared_experts(make_experts(1), moe::Weight<float>::own(random_matrix<float>(1, kD, 9)));
  check_permutation(layer, false, 70);
}

TEST_CASE("Hash routing: a permuted batch gives permuted outputs and dx, bit for bit", "[determinism][permutation][hash]") {
  for (const index_t k : {index_t(1), index_t(3)}) {
    CAPTURE(k);
    const moe::MoELayer layer(moe::HashRouter<float>(kE, kD, {k, 42}), make_experts(kE));
    check_permutation(layer, false, 50 + static_cast<std::uint32_t>(k));
  }
  std::vector<index_t> table(1000);
  for (std::size_t i = 0; i < table.size(); ++i) table[i] = static_cast<index_t>((i * 31) % kE);
  const moe::MoELayer layer(moe::HashRouter<float>::with_table(kE, kD, table), make_experts(kE));
  check_permutation(layer, false, 60);
}

}  // namespace determinism_test
