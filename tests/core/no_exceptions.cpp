// moe in a program built with -fno-exceptions (and OpenMP where CMake found it): MOE_THROW logs
// and aborts instead of throwing. Runs a top-2 SwiGLU layer's forward and backward on two threads
// and checks the forward against double loops; exits 1 on a mismatch. With the argument `bad` it
// passes a wrong-shaped output instead, which must end in MOE_THROW's message and abort (CTest
// matches the message).
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <string>

#define MOE_THROW(e) (std::fprintf(stderr, "moe error: %s\n", (e).what()), std::abort())
#include "../support/reference.hpp"

int main(int argc, char** argv) {
  using moe::index_t;
  using moe_test::random_matrix;
  const index_t d = 32, ff = 48, E = 4, T = 20;
  std::vector<moe::SwiGLU<float>> experts;
  for (index_t e = 0; e < E; ++e) {
    const auto seed = static_cast<std::uint32_t>(10 * e);
    experts.emplace_back(random_matrix<float>(ff, d, seed + 1), random_matrix<float>(ff, d, seed + 2),
                         random_matrix<float>(d, ff, seed + 3));
  }
  const moe::Matrix<float> gate = random_matrix<float>(E, d, 99);
  moe::MoELayer layer(moe::TopKRouter<float>(gate, moe::presets::mixtral(2)), experts);
  const moe::Matrix<float> x = random_matrix<float>(T, d, 5), dy = random_matrix<float>(T, d, 6);
  moe::Matrix<float> y(T, d), dx(T, d);
  if (argc > 1 && std::string(argv[1]) == "bad") {
    std::signal(SIGABRT, [](int) { std::_Exit(0); });  // MOE_THROW's abort ends the run normally, for CTest
    moe::Workspace<float> inference;
    moe::Matrix<float> wrong(T + 1, d);
    layer.forward(x, wrong, inference);
    std::printf("forward accepted a wrong-shaped y\n");
    return 1;
  }
  moe::TrainingWorkspace<float> ws;
  auto grads = layer.make_gradients();
  layer.forward_train(x, y, ws);
  layer.backward(x, dy, dx, grads, ws);

  // Mixtral: softmax over the top-2 logits, each chosen expert's output weighted by it.
  const moe_test::Mat gate_d = moe_test::to_double(gate);
  moe_test::Mat expected(std::size_t(T), std::vector<double>(std::size_t(d), 0.0));
  for (index_t t = 0; t < T; ++t) {
    const std::vector<double> row(x.row(t).data(), x.row(t).data() + d);
    const std::vector<double> logits = moe_test::linear(gate_d, row);
    const std::vector<index_t> chosen = moe_test::top_k(logits, 2);
    const std::vector<double> weights = moe_test::softmax({logits[std::size_t(chosen[0])], logits[std::size_t(chosen[1])]});
    for (std::size_t j = 0; j < 2; ++j) {
      const std::vector<double> out = moe_test::swiglu_row(experts[std::size_t(chosen[j])], x.row(t).data());
      for (index_t c = 0; c < d; ++c) expected[std::size_t(t)][std::size_t(c)] += weights[j] * out[std::size_t(c)];
    }
  }
  const double error = moe_test::max_relative_error(y, expected);
  const bool gradients_finite = dx.allFinite() && grads.router.allFinite();
  std::printf("no-exceptions build, %d thread(s): forward error %.2e, gradients finite: %s\n", moe::max_threads(), error,
              gradients_finite ? "yes" : "no");
  return error < 1e-5 && gradients_finite ? 0 : 1;
}
