// Load-balancing losses against literal transcriptions of the references (Megatron-Core, Hugging
// Face Mixtral and Switch, DeepSeek-V3), finite-difference gradients, the values at the extremes
// derived from the formulas, LoadAccumulator, BiasBalancer, and every documented error.
#include <catch2/catch.hpp>

#include <cmath>
#include <functional>
#include <limits>
#include <string>

#include "../support/reference.hpp"

// (A namespace of its own: this file may share a translation unit with other test files.)
namespace losses_test {

using namespace moe_test;

namespace {

using Ids = moe::Matrix<index_t>;  // [T, k]
using Dm = moe::Matrix<double>;

// The scores the losses see: softmax, or sigmoid normalized per token (Megatron's 1e-20 guard).
std::vector<double> ref_scores(const std::vector<double>& logits, moe::ScoreFunction score) {
  if (score == moe::ScoreFunction::softmax) return softmax(logits);
  std::vector<double> s(logits.size());
  double sum = 0;
  for (std::size_t e = 0; e < s.size(); ++e) sum += (s[e] = sigmoid(logits[e]));
  for (double& v : s) v /= sum + 1e-20;
  return s;
}

Mat ref_score_matrix(const Mat& z, moe::ScoreFunction score) {
  Mat p;
  for (const auto& row : z) p.push_back(ref_scores(row, score));
  return p;
}

// one_hot(ids) summed over the k choices: the [T, E] routing map.
Mat routing_map(const Ids& ids, index_t E) {
  Mat m(std::size_t(ids.rows()), std::vector<double>(std::size_t(E), 0.0));
  for (index_t t = 0; t < ids.rows(); ++t)
    for (index_t j = 0; j < ids.cols(); ++j) m[std::size_t(t)][std::size_t(ids(t, j))] += 1.0;
  return m;
}

// Megatron-Core switch_load_balancing_loss_func, transcribed:
//   aggregated_probs_per_expert = probs.sum(0)
//   aux_loss = sum(aggregated_probs_per_expert * tokens_per_expert) * E * coeff / (topk * T * T)
double ref_megatron(const Mat& probs, const std::vector<double>& tokens_per_expert, double total_tokens, index_t topk,
                    double coeff) {
  const std::size_t E = tokens_per_expert.size();
  double sum = 0;
  for (std::size_t e = 0; e < E; ++e) {
    double aggregated = 0;
    for (const auto& row : probs) aggregated += row[e];
    sum += aggregated * tokens_per_expert[e];
  }
  return sum * double(E) * coeff / (double(topk) * total_tokens * total_tokens);
}

std::vector<double> column_sums(const Mat& m, index_t E) {
  std::vector<double> s(std::size_t(E), 0.0);
  for (const auto& row : m)
    for (std::size_t e = 0; e < row.size(); ++e) s[e] += row[e];
  return s;
}

// Hugging Face Mixtral load_balancing_loss_func (no attention mask), transcribed:
//   expert_mask = one_hot(selected_experts, E)            [T, k, E]
//   tokens_per_expert = mean(expert_mask, dim=0)          [k, E]
//   router_prob_per_expert = mean(routing_weights, dim=0) [E]
//   loss = sum(tokens_per_expert * router_prob_per_expert[None]) * E;  model: coef * loss
double ref_hf_mixtral(const Mat& probs, const Ids& ids, index_t E, double coef) {
  const index_t Tn = ids.rows(), k = ids.cols();
  double loss = 0;
  for (index_t j = 0; j < k; ++j) {
    for (index_t e = 0; e < E; ++e) {
      double tokens_per_expert = 0, prob = 0;
      for (index_t t = 0; t < Tn; ++t) {
        tokens_per_expert += ids(t, j) == e ? 1.0 : 0.0;
        prob += probs[std::size_t(t)][std::size_t(e)];
      }
      loss += (tokens_per_expert / double(Tn)) * (prob / double(Tn));
    }
  }
  return coef * loss * double(E);
}

// Hugging Face SwitchTransformers load_balancing_loss_func on [G, S, E] groups, transcribed:
//   expert_mask = max over the k axis of one_hot(expert_indices)   [G, S, E]
//   tokens_per_group_and_expert = mean over S; router_prob_per_group_and_expert = mean over S
//   loss = mean over (G, E) of their product * E²;  model: coef * loss
double ref_hf_switch(const Mat& probs, const Ids& ids, index_t G, index_t S, index_t E, double coef) {
  double sum = 0;
  for (index_t g = 0; g < G; ++g) {
    for (index_t e = 0; e < E; ++e) {
      double tokens = 0, prob = 0;
      for (index_t s = 0; s < S; ++s) {
        const index_t t = g * S + s;
        double mask = 0;
        for (index_t j = 0; j < ids.cols(); ++j) mask = std::max(mask, ids(t, j) == e ? 1.0 : 0.0);
        tokens += mask;
        prob += probs[std::size_t(t)][std::size_t(e)];
      }
      sum += (tokens / double(S)) * (prob / double(S));
    }
  }
  return coef * sum / double(G * E) * double(E * E);
}

// DeepSeek-V3 complementary sequence-wise balance loss, from the paper, averaged over sequences:
//   f_i = E/(k·T_s) Σ_t 1(i ∈ top-k of t),  P_i = (1/T_s) Σ_t s'_{i,t},  L_s = α Σ_i f_i P_i
double ref_deepseek_sequence(const Mat& probs, const Ids& ids, const std::vector<index_t>& bounds, index_t E, double alpha,
                             bool per_choice) {
  double sum = 0;
  int sequences = 0;
  for (std::size_t q = 0; q + 1 < bounds.size(); ++q) {
    const index_t b = bounds[q], e_ = bounds[q + 1], Ts = e_ - b;
    if (Ts == 0) continue;
    ++sequences;
    const double denom = per_choice ? double(ids.cols() * Ts) : double(Ts);
    for (index_t i = 0; i < E; ++i) {
      double count = 0, prob = 0;
      for (index_t t = b; t < e_; ++t) {
        for (index_t j = 0; j < ids.cols(); ++j) count += ids(t, j) == i ? 1.0 : 0.0;
        prob += probs[std::size_t(t)][std::size_t(i)];
      }
      sum += double(E) / denom * count * (prob / double(Ts));
    }
  }
  return sequences == 0 ? 0.0 : alpha * sum / sequences;
}

// The batch loss from its definition for either normalization and score.
double ref_batch(const Dm& z, const Ids& ids, const moe::AuxLossOptions& o) {
  const index_t Tn = z.rows(), E = z.cols();
  if (Tn == 0) return 0;
  const Mat probs = ref_score_matrix(to_double(z), o.score);
  const std::vector<double> counts = column_sums(routing_map(ids, E), E);
  if (o.normalization == moe::AuxLossNormalization::per_choice) return ref_megatron(probs, counts, double(Tn), ids.cols(), o.coefficient);
  return ref_hf_mixtral(probs, ids, E, o.coefficient);
}

// Top-k ids of each row of the scores (ties to the lower index), as a router would choose.
Ids top_k_ids(const Dm& z, index_t k, moe::ScoreFunction score) {
  Ids ids(z.rows(), k);
  const Mat zd = to_double(z);
  for (index_t t = 0; t < z.rows(); ++t) {
    const std::vector<index_t> top = top_k(ref_scores(zd[std::size_t(t)], score), k);
    for (index_t j = 0; j < k; ++j) ids(t, j) = top[std::size_t(j)];
  }
  return ids;
}

// Central differences (h = 1e-6) of a loss of the logits against its analytic gradient. The
// counts are inputs of the loss, so they stay fixed while the logits move.
void check_gradient(const std::function<double(const Dm&, Dm&)>& loss, const Dm& z0) {
  Dm grad(z0.rows(), z0.cols()), scratch(z0.rows(), z0.cols());
  const double value = loss(z0, grad);
  const double h = 1e-6;
  Dm z = z0;
  double err = 0, scale = 0;
  for (index_t t = 0; t < z.rows(); ++t) {
    for (index_t e = 0; e < z.cols(); ++e) {
      z(t, e) = z0(t, e) + h;
      const double plus = loss(z, scratch);
      z(t, e) = z0(t, e) - h;
      const double minus = loss(z, scratch);
      z(t, e) = z0(t, e);
      const double fd = (plus - minus) / (2 * h);
      err = std::max(err, std::fabs(grad(t, e) - fd));
      scale = std::max(scale, std::fabs(grad(t, e)));
    }
  }
  // A central difference carries a rounding error of about ε·|L|/h; a few of those is the floor
  // below which a gradient entry cannot be told from zero.
  const double floor = 8 * std::numeric_limits<double>::epsilon() * std::max(std::fabs(value), 1.0) / h;
  CAPTURE(err, scale, floor);
  if (scale > 1e3 * floor) {
    REQUIRE(err / scale < 1e-6);
  } else {
    REQUIRE(err < floor);  // a constant loss (E = 1, or k = E): both gradients vanish
  }
}

// max |a − b| relative to max(max |b|, 1e-2): relative for gradients of ordinary size, absolute
// for gradients that vanish (k = E, E = 1) and are only rounding noise.
template <class A>
double grad_error(const A& actual, const Dm& expected) {
  double err = 0, scale = 1e-2;
  for (index_t t = 0; t < expected.rows(); ++t) {
    for (index_t e = 0; e < expected.cols(); ++e) {
      err = std::max(err, std::fabs(static_cast<double>(actual(t, e)) - expected(t, e)));
      scale = std::max(scale, std::fabs(expected(t, e)));
    }
  }
  return err / scale;
}

// Ids with every expert chosen equally often: token t takes experts t, t+1, ..., t+k-1 (mod E),
// so over T = m·E tokens each expert appears m·k times = T·k/E.
Ids uniform_ids(index_t Tn, index_t E, index_t k) {
  Ids ids(Tn, k);
  for (index_t t = 0; t < Tn; ++t)
    for (index_t j = 0; j < k; ++j) ids(t, j) = (t + j) % E;
  return ids;
}

double imbalance(const moe::Routing<double>& plan) {
  index_t most = 0, total = 0;
  for (index_t e = 0; e < plan.num_experts; ++e) {
    most = std::max(most, plan.tokens_of(e));
    total += plan.tokens_of(e);
  }
  return double(most) * double(plan.num_experts) / double(total);
}

}  // namespace

TEST_CASE("load_balancing_loss matches Megatron-Core and Hugging Face Mixtral", "[balance][losses]") {
  const index_t E = GENERATE(1, 3, 8);
  const index_t k = GENERATE_COPY(filter([E](index_t v) { return v <= E; }, values<index_t>({1, 2, 8})));
  const index_t Tn = GENERATE(0, 1, 7, 33);
  const auto score = GENERATE(moe::ScoreFunction::softmax, moe::ScoreFunction::sigmoid);
  const auto norm = GENERATE(moe::AuxLossNormalization::per_choice, moe::AuxLossNormalization::per_token);
  CAPTURE(E, k, Tn, int(score), int(norm));
  const moe::AuxLossOptions o{0.7, score, norm};
  const Dm z = random_matrix<double>(Tn, E, std::uint32_t(100 * E + 10 * k + Tn), 2.0);
  const Ids ids = top_k_ids(z, k, score);

  Dm grad(Tn, E);
  const double value = moe::load_balancing_loss(z, ids, grad, o);
  REQUIRE(value == Approx(ref_batch(z, ids, o)).epsilon(1e-12).margin(1e-15));
  // 0 <= L <= the collapse value α·E/k (per_choice) or α·E (per_token).
  const double maximum = o.coefficient * double(E) / (norm == moe::AuxLossNormalization::per_choice ? double(k) : 1.0);
  REQUIRE(value >= 0);
  REQUIRE(value <= maximum * (1 + 1e-12));

  check_gradient([&](const Dm& zz, Dm& g) { return moe::load_balancing_loss(zz, ids, g, o); }, z);

  // float: same value and gradient to float precision; computed in double inside.
  const moe::Matrix<float> zf = z.cast<float>();
  moe::Matrix<float> gf(Tn, E);
  Dm gd(Tn, E);
  const double vd = moe::load_balancing_loss(moe::Matrix<double>(zf.cast<double>()), ids, gd, o);
  const float vf = moe::load_balancing_loss(zf, ids, gf, o);
  REQUIRE(double(vf) == Approx(vd).epsilon(1e-6).margin(1e-7));
  REQUIRE(grad_error(gf, gd) < 1e-6);

  // int32 ids (as from a PyTorch int32 tensor) give the same loss.
  const Eigen::Matrix<int, Eigen::Dynamic, Eigen::Dynamic> ids32 = ids.cast<int>();
  Dm g32(Tn, E);
  REQUIRE(moe::load_balancing_loss(z, ids32, g32, o) == value);
  REQUIRE(g32 == grad);
}

TEST_CASE("Sigmoid scores keep the 1e-20 of their normalization where every sigmoid is tiny", "[balance][losses]") {
  // Logits near -50: each token's sigmoid scores sum to ~1e-21, below the 1e-20 guard, so the
  // normalized scores sum to far less than 1 (Megatron-Core's compute_routing_scores_for_aux_loss).
  const index_t E = 4, k = 2, Tn = 5;
  const moe::AuxLossOptions o = moe::AuxLossOptions::megatron(0.3, moe::ScoreFunction::sigmoid);
  const Dm z = (random_matrix<double>(Tn, E, 21, 2.0).array() - 50.0).matrix();
  const Ids ids = top_k_ids(z, k, o.score);
  for (const auto& row : ref_score_matrix(to_double(z), o.score)) {
    double sum = 0;
    for (const double p : row) sum += p;
    REQUIRE(sum < 0.5);  // the case this test is about
  }
  Dm grad(Tn, E);
  REQUIRE(moe::load_balancing_loss(z, ids, grad, o) == Approx(ref_batch(z, ids, o)).epsilon(1e-12));
  check_gradient([&](const Dm& zz, Dm& g) { return moe::load_balancing_loss(zz, ids, g, o); }, z);
}

TEST_CASE("Uniform load gives alpha (per_choice) and alpha*k (per_token) for any scores", "[balance][losses]") {
  const index_t E = GENERATE(1, 4, 8);
  const index_t k = GENERATE_COPY(filter([E](index_t v) { return v <= E; }, values<index_t>({1, 2, 3, 8})));
  const auto score = GENERATE(moe::ScoreFunction::softmax, moe::ScoreFunction::sigmoid);
  CAPTURE(E, k, int(score));
  const index_t Tn = 3 * E;
  const Ids ids = uniform_ids(Tn, E, k);
  // f_i = 1/E (per_choice): L = α·E·Σ_i (1/E)·P_i = α·Σ_i P_i = α since every score row sums to 1.
  const double alpha = 0.37;
  Dm grad(Tn, E);
  for (const Dm& z : {Dm(Dm::Zero(Tn, E)), random_matrix<double>(Tn, E, 5, 3.0)}) {
    REQUIRE(moe::load_balancing_loss(z, ids, grad, moe::AuxLossOptions{alpha, score, moe::AuxLossNormalization::per_choice}) ==
            Approx(alpha).epsilon(1e-13));
    REQUIRE(moe::load_balancing_loss(z, ids, grad, moe::AuxLossOptions{alpha, score, moe::AuxLossNormalization::per_token}) ==
            Approx(alpha * double(k)).epsilon(1e-13));
    // Each sequence of E tokens is itself uniform, so the sequence-level loss is α too.
    const std::vector<index_t> bounds{0, E, 2 * E, 3 * E};
    REQUIRE(moe::sequence_load_balancing_loss(z, ids, bounds, grad, moe::AuxLossOptions{alpha, score, moe::AuxLossNormalization::per_choice}) ==
            Approx(alpha).epsilon(1e-13));
  }
  if (score == moe::ScoreFunction::softmax) {
    // The presets name the references' normalizations.
    const Dm z = random_matrix<double>(Tn, E, 6, 1.0);
    REQUIRE(moe::load_balancing_loss(z, ids, grad, moe::AuxLossOptions::megatron(alpha)) == Approx(alpha).epsilon(1e-13));
    REQUIRE(moe::load_balancing_loss(z, ids, grad, moe::AuxLossOptions::hf_mixtral(alpha)) == Approx(alpha * double(k)).epsilon(1e-13));
  }
}

TEST_CASE("A collapsed router gives the maximum alpha*E/k (per_choice) and alpha*E (per_token)", "[balance][losses]") {
  const index_t E = GENERATE(2, 5, 8);
  const index_t k = GENERATE_COPY(filter([E](index_t v) { return v < E; }, values<index_t>({1, 2, 4})));
  const auto score = GENERATE(moe::ScoreFunction::softmax, moe::ScoreFunction::sigmoid);
  CAPTURE(E, k, int(score));
  // Every token chooses experts E-k .. E-1 with logit +40, the others −40: the off-choice score
  // mass is below (E−k)·e^-80 ≈ 1e-34, so P_i = 1/k on the chosen experts and 0 elsewhere.
  // per_choice: f_i = 1/k on them, L = α·E·k·(1/k)·(1/k) = α·E/k; per_token: f_i = 1, L = α·E.
  const index_t Tn = 11;
  Dm z = Dm::Constant(Tn, E, -40.0);
  Ids ids(Tn, k);
  for (index_t t = 0; t < Tn; ++t) {
    for (index_t j = 0; j < k; ++j) {
      ids(t, j) = E - k + j;
      z(t, E - k + j) = 40.0;
    }
  }
  const double alpha = 0.5;
  Dm grad(Tn, E);
  REQUIRE(moe::load_balancing_loss(z, ids, grad, moe::AuxLossOptions{alpha, score, moe::AuxLossNormalization::per_choice}) ==
          Approx(alpha * double(E) / double(k)).epsilon(1e-12));
  REQUIRE(moe::load_balancing_loss(z, ids, grad, moe::AuxLossOptions{alpha, score, moe::AuxLossNormalization::per_token}) ==
          Approx(alpha * double(E)).epsilon(1e-12));
}

TEST_CASE("sequence_load_balancing_loss matches DeepSeek-V3 and Hugging Face Switch", "[balance][losses]") {
  const index_t E = GENERATE(1, 4, 8);
  const index_t k = GENERATE_COPY(filter([E](index_t v) { return v <= E; }, values<index_t>({1, 2, 8})));
  const auto score = GENERATE(moe::ScoreFunction::softmax, moe::ScoreFunction::sigmoid);
  const auto norm = GENERATE(moe::AuxLossNormalization::per_choice, moe::AuxLossNormalization::per_token);
  CAPTURE(E, k, int(score), int(norm));
  const moe::AuxLossOptions o{0.3, score, norm};
  const bool per_choice = norm == moe::AuxLossNormalization::per_choice;

  // Unequal sequences with an empty one, which is skipped (and not counted in S).
  const std::vector<index_t> bounds{0, 5, 5, 6, 19};
  const index_t Tn = bounds.back();
  const Dm z = random_matrix<double>(Tn, E, std::uint32_t(7 * E + k), 2.0);
  const Ids ids = top_k_ids(z, k, score);
  const Mat probs = ref_score_matrix(to_double(z), score);
  Dm grad(Tn, E);
  const double value = moe::sequence_load_balancing_loss(z, ids, bounds, grad, o);
  REQUIRE(value == Approx(ref_deepseek_sequence(probs, ids, bounds, E, o.coefficient, per_choice)).epsilon(1e-12).margin(1e-15));
  check_gradient([&](const Dm& zz, Dm& g) { return moe::sequence_load_balancing_loss(zz, ids, bounds, g, o); }, z);

  // The average of each sequence's own batch loss, value and gradient (block s scaled by 1/S).
  double mean = 0;
  const double S = 3;  // non-empty sequences
  for (std::size_t q = 0; q + 1 < bounds.size(); ++q) {
    const index_t b = bounds[q], n = bounds[q + 1] - b;
    if (n == 0) continue;
    Dm block_grad(n, E);
    mean += moe::load_balancing_loss(Dm(z.middleRows(b, n)), Ids(ids.middleRows(b, n)), block_grad, o) / S;
    REQUIRE(grad_error(grad.middleRows(b, n), Dm(block_grad / S)) < 1e-14);
  }
  REQUIRE(value == Approx(mean).epsilon(1e-14));

  // One sequence: exactly the batch loss.
  Dm batch_grad(Tn, E), seq_grad(Tn, E);
  const std::vector<index_t> whole{0, Tn};
  REQUIRE(moe::sequence_load_balancing_loss(z, ids, whole, seq_grad, o) == moe::load_balancing_loss(z, ids, batch_grad, o));
  REQUIRE(seq_grad == batch_grad);

  // Hugging Face Switch: G equal groups of S tokens, softmax, per_token.
  if (score == moe::ScoreFunction::softmax && !per_choice) {
    const index_t G = 3, Sg = 6;
    const Dm zs = random_matrix<double>(G * Sg, E, 77, 2.0);
    const Ids ids_s = top_k_ids(zs, k, score);
    const std::vector<index_t> rows{0, Sg, 2 * Sg, 3 * Sg};
    Dm gs(G * Sg, E);
    const double hf = ref_hf_switch(ref_score_matrix(to_double(zs), score), ids_s, G, Sg, E, 0.01);
    REQUIRE(moe::sequence_load_balancing_loss(zs, ids_s, rows, gs, moe::AuxLossOptions::hf_switch(0.01)) ==
            Approx(hf).epsilon(1e-12));
  }
  // DeepSeek-V3 preset: sigmoid, per_choice.
  if (score == moe::ScoreFunction::sigmoid && per_choice) {
    Dm g3(Tn, E);
    REQUIRE(moe::sequence_load_balancing_loss(z, ids, bounds, g3, moe::AuxLossOptions::deepseek_v3(0.3)) == value);
  }
}

TEST_CASE("sequence_load_balancing_loss edge cases", "[balance][losses]") {
  const index_t E = 4;
  Dm grad(0, E);
  const Dm empty(0, E);
  const Ids no_ids(0, 2);
  REQUIRE(moe::sequence_load_balancing_loss(empty, no_ids, std::vector<index_t>{0, 0}, grad) == 0.0);
  // No sequences at all, as an empty batch may come (RouteContext::with_groups({0}) allows it).
  REQUIRE(moe::sequence_load_balancing_loss(empty, no_ids, std::vector<index_t>{0}, grad) == 0.0);
  REQUIRE(moe::sequence_load_balancing_loss(empty, no_ids, moe::SequenceBounds(), grad) == 0.0);
  REQUIRE(moe::load_balancing_loss(empty, no_ids, grad) == 0.0);
  REQUIRE(moe::router_z_loss(empty, grad) == 0.0);
  // Pointer + count boundaries, the form of RouteContext::group_begin.
  const Dm z = random_matrix<double>(6, E, 3);
  const Ids ids = top_k_ids(z, 2, moe::ScoreFunction::softmax);
  const index_t bounds[] = {0, 2, 6};
  Dm g1(6, E), g2(6, E);
  REQUIRE(moe::sequence_load_balancing_loss(z, ids, moe::SequenceBounds(bounds, 2), g1) ==
          moe::sequence_load_balancing_loss(z, ids, std::vector<index_t>{0, 2, 6}, g2));
  REQUIRE(g1 == g2);
}

TEST_CASE("Losses take the counts from a dropless router's plan", "[balance][losses]") {
  const index_t E = 6, d = 9, k = 2, Tn = 25;
  const auto score = GENERATE(moe::ScoreFunction::softmax, moe::ScoreFunction::sigmoid);
  moe::TopKOptions opt;
  opt.k = k;
  opt.score = score;
  const moe::TopKRouter<double> router(random_matrix<double>(E, d, 21), opt);
  moe::RouterOutput<double> out;
  router.route(random_matrix<double>(Tn, d, 22), out);
  const Dm z = out.logits();
  const Ids ids = top_k_ids(z, k, score);  // chosen independently of the plan
  const moe::AuxLossOptions o{1.3, score, moe::AuxLossNormalization::per_choice};
  Dm g_ids(Tn, E), g_plan(Tn, E);
  REQUIRE(moe::load_balancing_loss(z, out.plan, k, g_plan, o) == Approx(moe::load_balancing_loss(z, ids, g_ids, o)).epsilon(1e-15));
  REQUIRE(grad_error(g_plan, g_ids) < 1e-15);
  const std::vector<index_t> bounds{0, 10, Tn};
  REQUIRE(moe::sequence_load_balancing_loss(z, out.plan, k, bounds, g_plan, o) ==
          Approx(moe::sequence_load_balancing_loss(z, ids, bounds, g_ids, o)).epsilon(1e-15));
  moe::LoadAccumulator from_plan(E, k), from_ids(E, k);
  from_plan.add(out.plan);
  from_ids.add(ids);
  REQUIRE(from_plan.counts() == from_ids.counts());
  REQUIRE(from_plan.tokens() == Tn);
  // The plan of the RouterOutput can be passed straight from the router's output.
  REQUIRE(moe::load_balancing_loss(out.logits(), out.plan, k, g_plan, o) == moe::load_balancing_loss(z, out.plan, k, g_ids, o));
}

TEST_CASE("global_load_balancing_loss uses accumulated f with local P", "[balance][losses]") {
  const index_t E = 5, k = 2;
  const auto score = GENERATE(moe::ScoreFunction::softmax, moe::ScoreFunction::sigmoid);
  const auto norm = GENERATE(moe::AuxLossNormalization::per_choice, moe::AuxLossNormalization::per_token);
  CAPTURE(int(score), int(norm));
  const moe::AuxLossOptions o{0.9, score, norm};
  const Dm za = random_matrix<double>(9, E, 31, 2.0), zb = random_matrix<double>(14, E, 32, 2.0);
  const Ids ia = top_k_ids(za, k, score), ib = top_k_ids(zb, k, score);

  // One micro-batch: the batch loss, value and gradient.
  moe::LoadAccumulator acc(E, k);
  acc.add(ia);
  REQUIRE(acc.micro_batches() == 1);
  Dm ga(9, E), gb(9, E);
  REQUIRE(moe::global_load_balancing_loss(za, acc, ga, o) == Approx(moe::load_balancing_loss(za, ia, gb, o)).epsilon(1e-15));
  REQUIRE(grad_error(ga, gb) < 1e-15);

  // Two micro-batches: F from the concatenated batch's counts, P from micro-batch b alone.
  acc.add(ib);
  REQUIRE(acc.tokens() == 23);
  Ids both(23, k);
  both << ia, ib;
  const std::vector<double> counts = column_sums(routing_map(both, E), E);
  const Mat pb = ref_score_matrix(to_double(zb), score);
  const std::vector<double> P = column_sums(pb, E);
  double expected = 0;
  for (index_t i = 0; i < E; ++i) {
    const double F = counts[std::size_t(i)] / (23.0 * (norm == moe::AuxLossNormalization::per_choice ? double(k) : 1.0));
    expected += F * P[std::size_t(i)] / 14.0;
  }
  expected *= o.coefficient * double(E);
  Dm g2(14, E);
  REQUIRE(moe::global_load_balancing_loss(zb, acc, g2, o) == Approx(expected).epsilon(1e-12));
  check_gradient([&](const Dm& zz, Dm& g) { return moe::global_load_balancing_loss(zz, acc, g, o); }, zb);

  // Counts gathered elsewhere (an all-reduce) add the same way.
  moe::LoadAccumulator reduced(E, k);
  std::vector<index_t> c(static_cast<std::size_t>(E));
  for (index_t i = 0; i < E; ++i) c[std::size_t(i)] = index_t(counts[std::size_t(i)]);
  reduced.add_counts(c, 23);
  REQUIRE(reduced.counts() == acc.counts());
  Dm g3(14, E);
  REQUIRE(moe::global_load_balancing_loss(zb, reduced, g3, o) == moe::global_load_balancing_loss(zb, acc, g2, o));

  acc.reset();
  REQUIRE(acc.tokens() == 0);
  REQUIRE(acc.micro_batches() == 0);
  for (index_t v : acc.counts()) REQUIRE(v == 0);
  REQUIRE_THROWS_WITH(moe::global_load_balancing_loss(zb, acc, g2, o), Catch::Contains("load.tokens() = 0") && Catch::Contains("tokens = 14"));
  Dm none(0, E);
  REQUIRE(moe::global_load_balancing_loss(Dm(0, E), acc, none, o) == 0.0);
}

TEST_CASE("router_z_loss on hand logits and against finite differences", "[balance][losses]") {
  // Row 0: four zeros, lse = ln 4, softmax 1/4 each. Row 1: ln(1..4), lse = ln 10, softmax (1..4)/10.
  Dm z(2, 4);
  z << 0, 0, 0, 0, 0, std::log(2.0), std::log(3.0), std::log(4.0);
  const double beta = 0.25, l4 = std::log(4.0), l10 = std::log(10.0);
  Dm grad(2, 4);
  REQUIRE(moe::router_z_loss(z, grad, beta) == Approx(beta * (l4 * l4 + l10 * l10) / 2).epsilon(1e-14));
  for (index_t e = 0; e < 4; ++e) {
    REQUIRE(grad(0, e) == Approx(2 * beta / 2 * l4 * 0.25).epsilon(1e-14));
    REQUIRE(grad(1, e) == Approx(2 * beta / 2 * l10 * double(e + 1) / 10).epsilon(1e-14));
  }
  // Large logits stay finite: lse = 1000 + ln 2.
  Dm big(1, 2);
  big << 1000, 1000;
  Dm gbig(1, 2);
  REQUIRE(moe::router_z_loss(big, gbig) == Approx((1000 + std::log(2.0)) * (1000 + std::log(2.0))).epsilon(1e-14));
  REQUIRE(gbig(0, 0) == Approx(1000 + std::log(2.0)).epsilon(1e-14));  // 2/T · lse · 1/2

  const index_t E = GENERATE(1, 3, 8);
  const index_t Tn = GENERATE(1, 7, 20);
  const Dm zr = random_matrix<double>(Tn, E, std::uint32_t(E + 10 * Tn), 3.0);
  check_gradient([&](const Dm& zz, Dm& g) { return moe::router_z_loss(zz, g, 0.1); }, zr);
  // float agrees with double.
  moe::Matrix<float> gf(Tn, E);
  Dm gd(Tn, E);
  const moe::Matrix<float> zf = zr.cast<float>();
  REQUIRE(double(moe::router_z_loss(zf, gf, 0.1)) == Approx(moe::router_z_loss(Dm(zf.cast<double>()), gd, 0.1)).epsilon(1e-6));
  REQUIRE(grad_error(gf, gd) < 1e-6);
}

TEST_CASE("Losses write into maps and row blocks of the caller's buffers", "[balance][losses]") {
  const index_t Tn = 6, E = 4;
  const Dm z = random_matrix<double>(Tn, E, 41);
  const Ids ids = top_k_ids(z, 2, moe::ScoreFunction::softmax);
  Dm expected(Tn, E);
  const double v = moe::load_balancing_loss(z, ids, expected);
  std::vector<double> buffer(std::size_t(Tn * E));
  REQUIRE(moe::load_balancing_loss(moe::ConstMatrixMap<double>(z.data(), Tn, E), moe::ConstMatrixMap<index_t>(ids.data(), Tn, 2),
                                   moe::MatrixMap<double>(buffer.data(), Tn, E)) == v);
  REQUIRE(moe::MatrixMap<double>(buffer.data(), Tn, E) == expected);
  Dm wide = Dm::Zero(Tn + 2, E);
  REQUIRE(moe::load_balancing_loss(z, ids, wide.middleRows(1, Tn)) == v);
  REQUIRE(wide.middleRows(1, Tn) == expected);
  REQUIRE(wide.row(0).isZero());
  REQUIRE(wide.row(Tn + 1).isZero());
}

TEST_CASE("Losses reject bad input with named values", "[balance][losses][errors]") {
  const index_t Tn = 4, E = 4;
  const Dm z = random_matrix<double>(Tn, E, 51);
  const Ids ids = top_k_ids(z, 2, moe::ScoreFunction::softmax);
  Dm grad(Tn, E);

  // Gradient shape.
  Dm short_grad(3, E), narrow_grad(Tn, 3);
  REQUIRE_THROWS_AS(moe::load_balancing_loss(z, ids, short_grad), moe::invalid_argument);
  REQUIRE_THROWS_WITH(moe::load_balancing_loss(z, ids, short_grad), Catch::Contains("grad.rows() = 3") && Catch::Contains("logits.rows() = 4"));
  REQUIRE_THROWS_WITH(moe::load_balancing_loss(z, ids, narrow_grad), Catch::Contains("grad.cols() = 3") && Catch::Contains("logits.cols() = 4"));
  REQUIRE_THROWS_WITH(moe::router_z_loss(z, short_grad), Catch::Contains("grad.rows() = 3"));
  REQUIRE_THROWS_WITH(moe::sequence_load_balancing_loss(z, ids, std::vector<index_t>{0, 4}, narrow_grad), Catch::Contains("grad.cols() = 3"));
  {
    moe::LoadAccumulator acc(E, 2);
    acc.add(ids);
    REQUIRE_THROWS_WITH(moe::global_load_balancing_loss(z, acc, short_grad), Catch::Contains("grad.rows() = 3"));
  }
  Dm no_experts(Tn, 0);
  REQUIRE_THROWS_WITH(moe::load_balancing_loss(no_experts, Ids(Tn, 1), no_experts), Catch::Contains("logits.cols() = 0"));

  // k out of range, ids out of range or repeated, ids of another batch.
  REQUIRE_THROWS_WITH(moe::load_balancing_loss(z, Ids(Tn, 0), grad), Catch::Contains("k = 0") && Catch::Contains("num_experts = 4"));
  REQUIRE_THROWS_WITH(moe::load_balancing_loss(z, Ids(Ids::Zero(Tn, 5)), grad), Catch::Contains("k = 5") && Catch::Contains("num_experts = 4"));
  Ids bad = ids;
  bad(2, 1) = 4;
  REQUIRE_THROWS_WITH(moe::load_balancing_loss(z, bad, grad), Catch::Contains("top_k_ids(2, 1) = 4") && Catch::Contains("num_experts = 4"));
  bad(2, 1) = -1;
  REQUIRE_THROWS_WITH(moe::load_balancing_loss(z, bad, grad), Catch::Contains("top_k_ids(2, 1) = -1"));
  bad(2, 1) = bad(2, 0);
  REQUIRE_THROWS_WITH(moe::load_balancing_loss(z, bad, grad), Catch::Contains("token = 2") && Catch::Contains("expert = " + std::to_string(bad(2, 0))));
  REQUIRE_THROWS_WITH(moe::load_balancing_loss(z, Ids(ids.topRows(3)), grad), Catch::Contains("top_k_ids.rows() = 3") && Catch::Contains("logits.rows() = 4"));

  // Sequence boundaries that do not partition [0, T).
  const auto seq = [&](std::vector<index_t> b) { return moe::sequence_load_balancing_loss(z, ids, b, grad); };
  REQUIRE_THROWS_AS(seq({0, 3}), moe::invalid_argument);
  REQUIRE_THROWS_WITH(seq({0, 3}), Catch::Contains("sequence_begin[num_sequences] = 3") && Catch::Contains("tokens = 4"));
  REQUIRE_THROWS_WITH(seq({0, 2, 5}), Catch::Contains("sequence_begin[num_sequences] = 5") && Catch::Contains("tokens = 4"));
  REQUIRE_THROWS_WITH(seq({1, 4}), Catch::Contains("sequence_begin[0] = 1"));
  REQUIRE_THROWS_WITH(seq({0, 3, 2, 4}), Catch::Contains("sequence_begin[1] = 3") && Catch::Contains("sequence_begin[2] = 2"));
  REQUIRE_THROWS_WITH(seq({}), Catch::Contains("num_sequences = 0"));
  REQUIRE_THROWS_WITH(seq({0}), Catch::Contains("num_sequences = 0"));
  REQUIRE_THROWS_WITH(moe::sequence_load_balancing_loss(z, ids, moe::SequenceBounds(nullptr, 1), grad), Catch::Contains("null"));

  // Coefficient and logits.
  REQUIRE_THROWS_WITH(moe::load_balancing_loss(z, ids, grad, moe::AuxLossOptions::megatron(std::nan(""))), Catch::Contains("coefficient = nan"));
  REQUIRE_THROWS_WITH(moe::router_z_loss(z, grad, std::numeric_limits<double>::infinity()), Catch::Contains("coefficient = inf"));
  Dm nonfinite = z;
  nonfinite(1, 3) = std::numeric_limits<double>::quiet_NaN();
  REQUIRE_THROWS_AS(moe::load_balancing_loss(nonfinite, ids, grad), moe::numeric_error);
  REQUIRE_THROWS_WITH(moe::load_balancing_loss(nonfinite, ids, grad), Catch::Contains("token = 1") && Catch::Contains("expert = 3"));
  REQUIRE_THROWS_AS(moe::router_z_loss(nonfinite, grad), moe::numeric_error);

  // LoadAccumulator.
  REQUIRE_THROWS_WITH(moe::LoadAccumulator(E, 0), Catch::Contains("k = 0") && Catch::Contains("num_experts = 4"));
  REQUIRE_THROWS_WITH(moe::LoadAccumulator(E, 5), Catch::Contains("k = 5"));
  REQUIRE_THROWS_WITH(moe::LoadAccumulator(0, 1), Catch::Contains("num_experts = 0"));
  moe::LoadAccumulator acc(E, 2);
  REQUIRE_THROWS_WITH(acc.add(Ids(Ids::Zero(Tn, 1))), Catch::Contains("top_k_ids.cols() = 1") && Catch::Contains("k = 2"));
  REQUIRE_THROWS_WITH(acc.add(bad), Catch::Contains("token = 2"));
  REQUIRE(acc.tokens() == 0);  // a rejected add changes nothing
  REQUIRE_THROWS_WITH(acc.add_counts({1, 2, 3}, 5), Catch::Contains("counts.size() = 3") && Catch::Contains("num_experts = 4"));
  REQUIRE_THROWS_WITH(acc.add_counts({1, 2, 6, 0}, 5), Catch::Contains("counts[2] = 6") && Catch::Contains("tokens = 5"));
  REQUIRE_THROWS_WITH(acc.add_counts({0, 0, 0, 0}, -1), Catch::Contains("tokens = -1"));
  acc.add(ids);
  REQUIRE_THROWS_WITH(moe::global_load_balancing_loss(Dm(Tn, 3), acc, Dm(Tn, 3)), Catch::Contains("logits.cols() = 3") &&
                                                                                         Catch::Contains("load.num_experts() = 4"));

  // Plans: capacity drops, k, shape.
  moe::TopKOptions capped;
  capped.k = 1;
  capped.capacity_factor = 0.25;  // C = ceil(0.25 · 64 · 1 / 4) = 4 slots per expert for 64 tokens: drops are certain
  const moe::TopKRouter<double> router(random_matrix<double>(E, 3, 52), capped);
  moe::RouterOutput<double> out;
  router.route(random_matrix<double>(64, 3, 53), out);
  REQUIRE(!out.plan.dropped.empty());
  Dm g64(64, E);
  REQUIRE_THROWS_WITH(moe::load_balancing_loss(out.logits(), out.plan, 1, g64),
                      Catch::Contains("dropped tokens = " + std::to_string(out.plan.dropped.size())));
  REQUIRE_THROWS_WITH(moe::LoadAccumulator(E, 1).add(out.plan), Catch::Contains("dropped tokens"));
  moe::TopKOptions three;
  three.k = 3;
  const moe::TopKRouter<double> router3(random_matrix<double>(E, 3, 54), three);
  router3.route(random_matrix<double>(Tn, 3, 55), out);
  REQUIRE_THROWS_WITH(moe::load_balancing_loss(out.logits(), out.plan, 2, grad), Catch::Contains("experts = 3") && Catch::Contains("k = 2"));
  REQUIRE_THROWS_WITH(moe::load_balancing_loss(out.logits(), out.plan, 0, grad), Catch::Contains("k = 0"));
  REQUIRE_THROWS_WITH(moe::load_balancing_loss(out.logits(), out.plan, 5, grad), Catch::Contains("k = 5"));
  REQUIRE_THROWS_WITH(moe::load_balancing_loss(Dm(Tn + 1, E), out.plan, 3, Dm(Tn + 1, E)),
                      Catch::Contains("plan.num_tokens = 4") && Catch::Contains("logits.rows() = 5"));
  REQUIRE_THROWS_WITH(moe::sequence_load_balancing_loss(out.logits(), out.plan, 3, std::vector<index_t>{0, 5}, grad),
                      Catch::Contains("sequence_begin[num_sequences] = 5"));
}

TEST_CASE("BiasBalancer follows b += u * sign(mean load - load)", "[balance][bias]") {
  moe::BiasBalancer<double> balancer(4, 0.5);
  REQUIRE(balancer.bias() == moe::Vector<double>::Zero(4));
  // mean 4: expert 0 overloaded (−u), expert 1 underloaded (+u), experts 2 and 3 at the mean (sign 0).
  balancer.update(std::vector<index_t>{5, 3, 4, 4});
  REQUIRE(balancer.bias()[0] == -0.5);
  REQUIRE(balancer.bias()[1] == 0.5);
  REQUIRE(balancer.bias()[2] == 0.0);
  REQUIRE(balancer.bias()[3] == 0.0);
  balancer.update(std::vector<index_t>{0, 0, 0, 0});  // all at the mean: unchanged
  REQUIRE(balancer.bias()[0] == -0.5);
  REQUIRE(balancer.bias()[1] == 0.5);
  // A mean that is not an integer: 7/4 = 1.75; loads 2 are above it, 1 below.
  balancer.update(std::vector<index_t>{2, 2, 2, 1});
  REQUIRE(balancer.bias()[0] == -1.0);
  REQUIRE(balancer.bias()[1] == 0.0);
  REQUIRE(balancer.bias()[2] == -0.5);
  REQUIRE(balancer.bias()[3] == 0.5);
  // Loads near index_t's range, whose E · load overflowed before: each against the mean taken
  // exactly in long double (its 64-bit significand holds these sums).
  moe::BiasBalancer<double> huge(4, 0.5);
  const index_t big = index_t(1) << 61;
  const std::vector<index_t> huge_load = {big, big, big - 1, 3};
  huge.update(huge_load);
  long double total = 0;
  for (const index_t c : huge_load) total += static_cast<long double>(c);
  for (std::size_t e = 0; e < 4; ++e) {
    const long double gap = total / 4 - static_cast<long double>(huge_load[e]);
    CHECK(huge.bias()[index_t(e)] == (gap > 0 ? 0.5 : gap < 0 ? -0.5 : 0.0));
  }

  // From a plan (its per-expert assignments) and from a LoadAccumulator (its counts).
  const index_t E = 4;
  moe::TopKOptions opt;
  opt.k = 2;
  moe::TopKRouter<double> router(random_matrix<double>(E, 5, 61), opt);
  moe::RouterOutput<double> out;
  router.route(random_matrix<double>(9, 5, 62), out);
  moe::BiasBalancer<double> from_plan(E, 0.25), from_load(E, 0.25), from_acc(E, 0.25);
  std::vector<index_t> load;
  for (index_t e = 0; e < E; ++e) load.push_back(out.plan.tokens_of(e));
  from_plan.update(out.plan);
  from_load.update(load);
  moe::LoadAccumulator acc(E, 2);
  acc.add(out.plan);
  from_acc.update(acc);
  REQUIRE(from_plan.bias() == from_load.bias());
  REQUIRE(from_acc.bias() == from_load.bias());
  from_plan.apply(router);
  REQUIRE(router.selection_bias() == from_plan.bias());
  from_plan.reset();
  REQUIRE(from_plan.bias().isZero());
  moe::Vector<double> restored(4);
  restored << 0.1, 0.2, 0.3, 0.4;
  from_plan.set_bias(restored);
  REQUIRE(from_plan.bias() == restored);

  // Errors.
  REQUIRE_THROWS_WITH(moe::BiasBalancer<double>(0, 0.1), Catch::Contains("num_experts = 0"));
  REQUIRE_THROWS_WITH(moe::BiasBalancer<double>(4, 0.0), Catch::Contains("update_rate = 0"));
  REQUIRE_THROWS_WITH(moe::BiasBalancer<double>(4, -1.0), Catch::Contains("update_rate = -1"));
  REQUIRE_THROWS_WITH(moe::BiasBalancer<double>(4, std::nan("")), Catch::Contains("update_rate = nan"));
  // A refused update, like a refused bias, leaves the bias as it was (checked after the errors).
  const moe::Vector<double> before_errors = balancer.bias();
  REQUIRE_THROWS_WITH(balancer.update(std::vector<index_t>{1, 2, 3}), Catch::Contains("load.size() = 3") && Catch::Contains("num_experts = 4"));
  REQUIRE_THROWS_WITH(balancer.update(std::vector<index_t>{1, -2, 3, 4}), Catch::Contains("load[1] = -2"));
  constexpr index_t kMax = std::numeric_limits<index_t>::max();
  REQUIRE_THROWS_WITH(balancer.update(std::vector<index_t>{1, kMax, 0, 0}),
                      Catch::Contains("overflows") && Catch::Contains("load[1] = " + std::to_string(kMax)) &&
                          Catch::Contains("sum before it = 1"));
  REQUIRE_THROWS_WITH(balancer.set_bias(moe::Vector<double>::Zero(3)), Catch::Contains("bias.size() = 3"));
  restored[2] = std::numeric_limits<double>::infinity();
  REQUIRE_THROWS_WITH(balancer.set_bias(restored), Catch::Contains("bias[2]"));
  REQUIRE_THROWS(balancer.update(std::vector<index_t>{5, 1, -1, 0}));  // a bad load after good ones
  REQUIRE(balancer.bias() == before_errors);
  moe::TopKRouter<double> other(random_matrix<double>(5, 5, 63), opt);
  REQUIRE_THROWS_WITH(balancer.apply(other), Catch::Contains("router.num_experts() = 5") && Catch::Contains("num_experts = 4"));
  moe::BiasBalancer<double> five(5, 0.1);
  REQUIRE_THROWS_WITH(five.update(out.plan), Catch::Contains("plan.num_experts = 4") && Catch::Contains("num_experts = 5"));
}

TEST_CASE("A layer takes a selection bias into its own router, from the caller or a BiasBalancer", "[balance][bias]") {
  const index_t E = 4, d = 5, ff = 3, Tn = 12;
  moe::TopKOptions opt;
  opt.k = 2;
  const moe::Matrix<double> gate = random_matrix<double>(E, d, 71), x = random_matrix<double>(Tn, d, 72);
  std::vector<moe::SwiGLU<double>> experts;
  for (index_t e = 0; e < E; ++e) {
    experts.emplace_back(random_matrix<double>(ff, d, 80 + std::uint32_t(e)), random_matrix<double>(ff, d, 90 + std::uint32_t(e)),
                         random_matrix<double>(d, ff, 100 + std::uint32_t(e)));
  }
  moe::MoELayer layer(moe::TopKRouter<double>(gate, opt), experts);
  moe::BiasBalancer<double> balancer(E, 0.5);
  balancer.update(std::vector<index_t>{20, 0, 2, 2});  // b = (-0.5, 0.5, 0.5, 0.5)
  balancer.apply(layer);
  REQUIRE(layer.router().selection_bias() == balancer.bias());

  // The layer routes as a router given the same bias.
  moe::TopKRouter<double> biased(gate, opt);
  biased.set_selection_bias(balancer.bias());
  moe::RouterOutput<double> expected;
  biased.route(x, expected);
  moe::Workspace<double> ws;
  moe::Matrix<double> y(Tn, d);
  layer.forward(x, y, ws);
  REQUIRE(ws.routing.plan.token == expected.plan.token);
  REQUIRE(ws.routing.plan.expert_begin == expected.plan.expert_begin);
  // Softmax scores lie in [0, 1]: expert 0 would need p0 - 0.5 > p_j + 0.5, so no token chooses it.
  REQUIRE(ws.routing.plan.tokens_of(0) == 0);

  moe::Vector<double> by_hand(E);
  by_hand << 0, 0, 0, 1;
  layer.set_selection_bias(by_hand);
  REQUIRE(layer.router().selection_bias() == by_hand);
  REQUIRE_THROWS_WITH(layer.set_selection_bias(moe::Vector<double>::Zero(3)), Catch::Contains("bias.size() = 3"));
  REQUIRE(layer.router().selection_bias() == by_hand);  // unchanged by the rejected call
  moe::BiasBalancer<double> five(5, 0.1);
  REQUIRE_THROWS_WITH(five.apply(layer), Catch::Contains("layer.num_experts() = 4") && Catch::Contains("num_experts = 5"));
}

TEST_CASE("BiasBalancer balances a skewed router", "[balance][bias]") {
  // E = 8 sigmoid experts, k = 2 (DeepSeek-V3 style). Feature 0 of every token is 1 and expert 0
  // weighs it by 3, so its logit is ≈ 3 against ≈ 0 ± 0.7 for the others: every token picks
  // expert 0, whose load is T against a mean of T·k/E, an imbalance (max/mean) near the collapse
  // value E/k = 4.
  //
  // Threshold. The sign rule moves each bias by u per step toward its balancing value, so once the
  // score gap (σ(3) − σ(~0.7) ≈ 0.28, closed at up to 2u per step) is gone the biases oscillate
  // within ±u of balance. What remains is the sampling noise of a fresh batch: an expert's load is
  // ≈ binomial with mean T·k/E = 256 and sd ≤ √256 = 16, so the heaviest of 8 exceeds the mean
  // by more than 4 sd (imbalance 1 + 64/256 = 1.25) with negligible probability. We allow 1.5 to
  // cover the ±u oscillation on top (u = 0.01 against score spreads of ~0.1 per expert).
  const index_t E = 8, k = 2, d = 16, Tn = 1024;
  const double u = 0.01;
  moe::Matrix<double> W = random_matrix<double>(E, d, 11, 0.5);
  W(0, 0) = 3.0;
  moe::TopKOptions opt;
  opt.k = k;
  opt.score = moe::ScoreFunction::sigmoid;
  moe::TopKRouter<double> router(W, opt);
  moe::BiasBalancer<double> balancer(E, u);
  moe::RouterOutput<double> out;
  const auto batch = [&](std::uint32_t seed) {
    moe::Matrix<double> x = random_matrix<double>(Tn, d, seed);
    x.col(0).setOnes();
    return x;
  };

  std::vector<double> trace;
  for (int step = 0; step < 50; ++step) {
    router.route(batch(std::uint32_t(1000 + step)), out);
    trace.push_back(imbalance(out.plan));
    // The bias picks the experts; the weights stay the raw scores.
    for (index_t t = 0; t < Tn; t += 97) {
      for (index_t j = out.plan.token_begin[std::size_t(t)]; j < out.plan.token_begin[std::size_t(t + 1)]; ++j) {
        const index_t a = out.plan.assignment[std::size_t(j)];
        REQUIRE(out.plan.weight[std::size_t(a)] == out.scores()(t, out.plan.expert_of_assignment(a)));
      }
    }
    balancer.update(out.plan);
    balancer.apply(router);
  }
  CAPTURE(trace);
  REQUIRE(trace.front() > 3.5);  // the setup really is collapsed
  // Monotone-ish: no 10-step window's mean exceeds the previous one's by more than the noise.
  for (std::size_t w = 10; w < 50; w += 10) {
    double prev = 0, cur = 0;
    for (std::size_t s = 0; s < 10; ++s) {
      prev += trace[w - 10 + s] / 10;
      cur += trace[w + s] / 10;
    }
    CAPTURE(w, prev, cur);
    REQUIRE(cur < prev + 0.1);
  }
  for (std::size_t s = 40; s < 50; ++s) REQUIRE(trace[s] < 1.5);
  // On a batch it never saw.
  router.route(batch(7), out);
  const double held_out = imbalance(out.plan);
  CAPTURE(held_out);
  REQUIRE(held_out < trace.front());
  REQUIRE(held_out < 1.5);
  // The overloaded expert's bias went down, below every other expert's.
  for (index_t e = 1; e < E; ++e) REQUIRE(balancer.bias()[0] < balancer.bias()[e]);
}

}  // namespace losses_test
