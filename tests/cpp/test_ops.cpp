// Loads the stand-alone sfron_ops library, calls every op through the dispatcher on CPU tensors
// and checks the results against a plain per-tensor libtorch reference of the same math (SPEC.md).
// Exit status 0 when every check passes; run by ctest.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <dlfcn.h>

#include <cmath>
#include <cstdio>
#include <optional>
#include <string>
#include <vector>

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
  if (!ok) ++failures;
}

bool close(const at::Tensor& actual, const at::Tensor& expected, double rtol = 1e-5, double atol = 1e-6) {
  return at::allclose(actual.to(at::kFloat), expected.to(at::kFloat), rtol, atol);
}

bool all_close(const std::vector<at::Tensor>& actual, const std::vector<at::Tensor>& expected, double rtol = 1e-5,
               double atol = 1e-6) {
  for (size_t i = 0; i < actual.size(); ++i) {
    if (!close(actual[i], expected[i], rtol, atol)) return false;
  }
  return true;
}

std::vector<at::Tensor> clones(const std::vector<at::Tensor>& tensors) {
  std::vector<at::Tensor> out;
  for (const auto& t : tensors) out.push_back(t.clone());
  return out;
}

template <class Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

using TL = at::TensorList;
using OptT = const std::optional<at::Tensor>&;

// ---------------------------------------------------------------- the reference, tensor by tensor

at::Tensor direction(const at::Tensor& g, const at::Tensor* m, const at::Tensor& coef) {
  at::Tensor u = g.to(at::kFloat);
  if (m != nullptr) u = u * m->to(at::kFloat);
  return u * coef;
}

at::Tensor clip_coef(const at::Tensor& norm_state, double scale, double max_norm) {
  at::Tensor coef = at::full({}, scale, at::kFloat);
  if (max_norm > 0) coef = coef * at::clamp_max(max_norm / (norm_state[0].sqrt() + 1e-6), 1.0);
  return coef;
}

void check_masked_norm(const std::vector<at::Tensor>& grads, const std::vector<at::Tensor>& masks) {
  auto norm = op<void(TL, TL, const at::Tensor&, double, bool, OptT)>("sfron_ops::masked_sq_norm_");
  at::Tensor state = at::zeros({2});
  norm.call(grads, masks, state, 1.0, false, at::full({}, 2.5, at::kFloat));  // alpha as a tensor
  double expected = 0.0;
  at::Tensor one = at::full({}, 2.5, at::kFloat);
  for (size_t i = 0; i < grads.size(); ++i) expected += direction(grads[i], &masks[i], one).pow(2).sum().item<double>();
  expect(std::abs(state[0].item<double>() - expected) <= 1e-5 * expected && state[1].item<float>() == 0.0f,
         "masked_sq_norm_ sums the squared masked direction");

  std::vector<at::Tensor> bad = clones(grads);
  bad[4].view(-1)[20000] = std::nan("");
  at::Tensor flagged = at::zeros({2});
  norm.call(bad, masks, flagged, 1.0, false, std::nullopt);
  expect(flagged[1].item<float>() == 1.0f, "masked_sq_norm_ flags a NaN");
}

void check_sgd(const std::vector<at::Tensor>& grads, const std::vector<at::Tensor>& masks) {
  auto sgd = op<void(TL, TL, TL, TL, TL, OptT, double, double, double, double, double, bool, double, bool, OptT,
                     OptT)>("sfron_ops::sgd_update_");
  const double lr = 0.05, scale = -3.0, momentum = 0.9, dampening = 0.1, wd = 1e-2, max_norm = 0.5;
  std::vector<at::Tensor> params, bufs, steps;
  for (const auto& g : grads) {
    params.push_back(at::randn_like(g));
    bufs.push_back(at::randn_like(g));
    steps.push_back(at::zeros({}));
  }
  at::Tensor state = at::tensor({7.0f, 0.0f});
  std::vector<at::Tensor> p_ref = clones(params), b_ref = clones(bufs);
  for (int step = 0; step < 3; ++step) {
    // lr as a tensor scalar on the last step: 1.0 * tensor
    const std::optional<at::Tensor> lr_tensor =
        step == 2 ? std::optional<at::Tensor>(at::full({}, lr, at::kFloat)) : std::nullopt;
    sgd.call(params, grads, masks, bufs, steps, state, step == 2 ? 1.0 : lr, scale, momentum, dampening, wd, step == 2,
             max_norm, false, lr_tensor, std::nullopt);
    const at::Tensor coef = clip_coef(state, scale, max_norm);
    for (size_t i = 0; i < grads.size(); ++i) {
      at::Tensor d = direction(grads[i], &masks[i], coef) + wd * p_ref[i];
      b_ref[i] = step == 0 ? d : momentum * b_ref[i] + (1 - dampening) * d;
      d = step == 2 ? d + momentum * b_ref[i] : b_ref[i];
      p_ref[i] = p_ref[i] - lr * d;
    }
  }
  expect(all_close(params, p_ref) && all_close(bufs, b_ref), "sgd_update_ follows torch.optim.SGD with clipping");
  expect(steps[0].item<float>() == 3.0f, "sgd_update_ counts steps");

  at::Tensor skip = at::tensor({1.0f, 1.0f});
  std::vector<at::Tensor> before = clones(params);
  sgd.call(params, grads, masks, bufs, steps, skip, lr, scale, momentum, dampening, wd, false, max_norm, false,
           std::nullopt, std::nullopt);
  expect(all_close(params, before, 0.0, 0.0) && steps[0].item<float>() == 3.0f,
         "sgd_update_ skips everything on a non-finite flag");
}

void check_adamw(const std::vector<at::Tensor>& grads, const std::vector<at::Tensor>& masks) {
  auto adamw = op<void(TL, TL, TL, TL, TL, TL, OptT, double, double, double, double, double, double, double, bool,
                       OptT, OptT)>("sfron_ops::adamw_update_");
  const double lr = 0.01, scale = 2.0, b1 = 0.8, b2 = 0.95, eps = 1e-6, wd = 0.05;
  std::vector<at::Tensor> params, m1, m2, steps;
  for (const auto& g : grads) {
    params.push_back(at::randn_like(g));
    m1.push_back(at::zeros_like(g));
    m2.push_back(at::zeros_like(g));
    steps.push_back(at::zeros({}));
  }
  std::vector<at::Tensor> p_ref = clones(params), m1_ref = clones(m1), m2_ref = clones(m2);
  for (int step = 1; step <= 3; ++step) {
    // the ascent scale as a tensor scalar: -1.0 * tensor
    adamw.call(params, grads, masks, m1, m2, steps, std::nullopt, lr, -1.0, b1, b2, eps, wd, 0.0, false, std::nullopt,
               std::optional<at::Tensor>(at::full({}, -scale, at::kFloat)));
    const at::Tensor coef = at::full({}, scale, at::kFloat);
    for (size_t i = 0; i < grads.size(); ++i) {
      const at::Tensor u = direction(grads[i], &masks[i], coef);
      m1_ref[i] = b1 * m1_ref[i] + (1 - b1) * u;
      m2_ref[i] = b2 * m2_ref[i] + (1 - b2) * u * u;
      const double bias1 = 1 - std::pow(b1, step), bias2 = 1 - std::pow(b2, step);
      p_ref[i] = p_ref[i] * (1 - lr * wd) - lr * (m1_ref[i] / bias1) / ((m2_ref[i] / bias2).sqrt() + eps);
    }
  }
  expect(all_close(params, p_ref) && all_close(m1, m1_ref) && all_close(m2, m2_ref),
         "adamw_update_ follows torch.optim.AdamW");
}

void check_fisher_mask_and_slow(const std::vector<at::Tensor>& grads) {
  auto fisher = op<void(TL, TL, double)>("sfron_ops::fisher_accumulate_");
  std::vector<at::Tensor> forget, remain;
  for (const auto& g : grads) {
    forget.push_back(at::zeros_like(g));
    remain.push_back(at::rand_like(g));
  }
  fisher.call(forget, grads, 0.5);
  fisher.call(forget, grads, 0.5);
  bool ok = true;
  for (size_t i = 0; i < grads.size(); ++i) ok &= close(forget[i], grads[i] * grads[i]);
  expect(ok, "fisher_accumulate_ adds scale * g^2");

  auto mask = op<void(TL, TL, TL, const at::Tensor&, double)>("sfron_ops::saliency_mask_");
  std::vector<at::Tensor> masks;
  for (const auto& g : grads) masks.push_back(at::zeros_like(g, at::kBool));
  at::Tensor kept = at::zeros({}, at::kLong);
  mask.call(forget, remain, masks, kept, 1.0);
  int64_t expected_kept = 0;
  ok = true;
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor keep = (forget[i] + 1e-15) / (remain[i] + 1e-15) >= 1.0;
    ok &= at::equal(masks[i], keep);
    expected_kept += keep.sum().item<int64_t>();
  }
  expect(ok && kept.item<int64_t>() == expected_kept, "saliency_mask_ keeps ratio >= gamma and counts");

  auto slow = op<void(TL, TL, double, bool, OptT, OptT, int64_t)>("sfron_ops::slow_sync_");
  std::vector<at::Tensor> slow_w = clones(grads), fast = clones(remain);
  // with a counter and a period of 2: the first call only counts, the second syncs and restarts the count
  at::Tensor counter = at::zeros({});
  slow.call(slow_w, fast, 0.25, true, std::nullopt, counter, 2);
  ok = at::equal(slow_w[0], grads[0]) && counter.item<float>() == 1.0f;
  slow.call(slow_w, fast, 0.25, true, at::tensor({0.0f, 1.0f}), counter, 2);  // a skipped step: nothing
  ok &= at::equal(slow_w[0], grads[0]) && counter.item<float>() == 1.0f;
  slow.call(slow_w, fast, 0.25, true, at::tensor({0.0f, 0.0f}), counter, 2);
  ok &= counter.item<float>() == 0.0f;
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor expected = grads[i] + 0.25 * (remain[i] - grads[i]);
    ok &= close(slow_w[i], expected) && at::equal(fast[i], slow_w[i]);
  }
  slow_w = clones(grads);
  slow.call(slow_w, clones(remain), 1.0, false, std::nullopt, std::nullopt, 1);
  for (size_t i = 0; i < grads.size(); ++i) ok &= at::equal(slow_w[i], remain[i]);
  expect(ok, "slow_sync_ counts to its period, skips on a flag, interpolates (exactly at alpha = 1) and resets");
}

}  // namespace

int main() {
  void* library = dlopen(SFRON_OPS_LIBRARY, RTLD_NOW | RTLD_GLOBAL);
  if (library == nullptr) {
    std::printf("FAIL cannot load %s: %s\n", SFRON_OPS_LIBRARY, dlerror());
    return 1;
  }
  at::manual_seed(0);
  // sizes: odd, one element, empty, across the CPU chunk of 16384 elements
  std::vector<at::Tensor> grads = {at::randn({22}), at::randn({1}), at::randn({0}), at::randn({3, 7, 5}),
                                   at::randn({70001})};
  std::vector<at::Tensor> masks;
  for (const auto& g : grads) masks.push_back(at::rand_like(g) < 0.5);
  try {
    check_masked_norm(grads, masks);
    check_sgd(grads, masks);
    check_adamw(grads, masks);
    check_fisher_mask_and_slow(grads);
    auto norm = op<void(TL, TL, const at::Tensor&, double, bool, OptT)>("sfron_ops::masked_sq_norm_");
    bool raised = false;
    try {
      norm.call({at::randn({4})}, {at::ones({5})}, at::zeros({2}), 1.0, false, std::nullopt);
    } catch (const c10::Error& error) {
      raised = std::string(error.what()).find("masks[0] has shape (5,), expected (4,)") != std::string::npos;
    }
    expect(raised, "a bad call names the argument and index");
  } catch (const std::exception& error) {
    std::printf("FAIL unexpected exception: %s\n", error.what());
    return 1;
  }
  std::printf("%s: %d failure(s)\n", failures ? "FAILED" : "PASSED", failures);
  return failures == 0 ? 0 : 1;
}
