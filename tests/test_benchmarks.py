"""The benchmark harness: its cases, its byte model, its baselines' math and one smoke run of the command.

Nothing here times anything: speed is measured by ``python -m benchmarks.run``.
"""

import json

import pytest
import torch

from benchmarks import cases, host_bound, measure, report, run, suite
from benchmarks.ops import OPS


def _needs_torchvision():
    # torchvision comes with the CUDA build of torch (requirements-cuda.txt, as in CI); PyPI's does not load beside
    # a CPU build of torch
    pytest.importorskip("torchvision", reason="the ResNet-18 and ViT-B/16 cases need torchvision")


def test_model_cases_have_the_published_parameter_counts():
    _needs_torchvision()
    resnet = cases.build_case("resnet18_cifar")
    vit = cases.build_case("vit_b16")
    assert (resnet.n_tensors, resnet.numel) == (62, 11_173_962)
    assert (vit.n_tensors, vit.numel) == (152, 85_806_346)


def test_synthetic_cases_have_the_requested_sizes():
    assert cases.build_case("flat", "cuda").shapes == ((1 << 28,),)
    assert cases.build_case("flat", "cpu").shapes == ((1 << 24,),)
    tiny = cases.build_case("many_tiny", "cpu")
    assert tiny.n_tensors == 10_000 and set(tiny.shapes) == {(1024,)}


def test_ragged_case_is_odd_sized_and_misaligned():
    case = cases.build_case("ragged", "cpu", "smoke")
    state = cases.make_state(case, torch.float32, "cpu", ("params",))
    sizes = [p.numel() for p in state.params]
    assert {8, 9, 64, 65} <= set(sizes)
    assert sum(n % 8 in (1, 3) for n in sizes) >= len(sizes) - 4
    offsets = [p.storage_offset() for p in state.params]
    assert offsets == list(case.offsets) and 1 in offsets
    assert all(p.data_ptr() % 16 != 0 for p, off in zip(state.params, offsets) if off)
    copy = state.copy()
    assert [p.storage_offset() for p in copy.params] == offsets
    assert all(torch.equal(a, b) and a.data_ptr() != b.data_ptr() for a, b in zip(copy.params, state.params))


def test_byte_model_matches_the_performance_notes():
    # fp32 bytes per parameter from the byte model in benchmarks/ops.py's docstring
    expected = {"forget_plain": 13, "forget_clip": 18, "forget_full": 26, "fisher": 12, "saliency_mask": 9,
                "slow_sync_0.5": 16, "slow_sync_1": 8}
    for op, per_param in expected.items():
        assert OPS[op].modelled_bytes(1000, torch.float32) == per_param * 1000, op
    assert OPS["fisher"].modelled_bytes(1000, torch.bfloat16) == 10 * 1000


def test_stream_bound_splits_the_bytes_by_access_pattern():
    roofs = {"read_gbs": 1.0, "copy_gbs": 2.0, "roof_gbs": 5.0}
    # 20 B read-only at 1 GB/s, 30 B copied at 2 GB/s, 50 B in place at 5 GB/s
    assert measure.stream_bound_s(100, 20, 30, roofs) == pytest.approx((20 + 15 + 10) * 1e-9)
    # a row's roofs: the mean of those measured before and after it, and the drift in between
    mid = measure.around({"roof_gbs": 10.0, "read_gbs": 4.0, "elements": 7}, {"roof_gbs": 12.0, "read_gbs": 6.0})
    assert mid == pytest.approx({"roof_gbs": 11.0, "read_gbs": 5.0, "roof_drift": 2 / 11})
    for name, spec in OPS.items():
        for dtype in (torch.float32, torch.bfloat16):
            total, read, copy = (f(1000, dtype) for f in (spec.modelled_bytes, spec.read_bytes, spec.copy_bytes))
            assert 0 <= read + copy <= total, name
    # the norm only reads; a sync at a = 1 is a copy of p into slow; a plain forget step is all in place
    assert OPS["masked_norm"].read_bytes(10, torch.float32) == OPS["masked_norm"].modelled_bytes(10, torch.float32)
    assert OPS["slow_sync_1"].copy_bytes(10, torch.float32) == OPS["slow_sync_1"].modelled_bytes(10, torch.float32)
    assert OPS["forget_plain"].read_bytes(10, torch.float32) == OPS["forget_plain"].copy_bytes(10, torch.float32) == 0


@pytest.mark.parametrize("op", list(OPS))
def test_every_contender_computes_what_the_reference_computes(op):
    contenders, _ = suite.contenders("cpu")
    assert {"reference", "torch", "official"} <= {c.name for c in contenders}
    errors = suite.verify(op, cases.build_case("ragged", "cpu", "smoke"), torch.float32, "cpu", contenders)
    assert set(errors) == {c.name for c in contenders}
    for name, err in errors.items():
        if name != "reference":
            assert err <= run.VERIFY_RTOL["fp32"], f"{op}: {name} differs from the reference by {err:.2e}"


def test_smoke_run_writes_json_markdown_and_chart(tmp_path, capsys):
    _needs_torchvision()
    threads = torch.get_num_threads()
    results = run.main(["--smoke", "--device", "cpu", "--out", str(tmp_path)])
    assert torch.get_num_threads() == threads  # the run restores the thread count it changed
    assert run.failures(results) == []
    saved = json.loads((tmp_path / "cpu-smoke.json").read_text())
    assert saved["meta"]["torch"] == torch.__version__ and saved["meta"]["date_utc"]
    contenders = saved["contenders"]
    assert {"reference", "foreach", "torch", "official"} <= set(contenders)
    measured = {(r["op"], r["dtype"], r["contender"]) for r in saved["rows"]}
    expected = {(op, d, c) for op, spec in OPS.items() for d in spec.dtypes for c in contenders}
    assert measured == expected
    for r in saved["rows"]:
        assert 0 < r["p20_s"] <= r["median_s"] <= r["p80_s"], r
        assert r["gbs"] == pytest.approx(r["modelled_bytes"] / r["median_s"] / 1e9)
        # the roofs measured next to the group, and the share of the op's stream bound
        assert r["roof_share"] == pytest.approx(r["gbs"] / r["roof_gbs"]) and r["read_gbs"] > 0
        assert 0 <= r["roof_drift"] < 2
        bound = measure.stream_bound_s(r["modelled_bytes"], r["read_bytes"], r["copy_bytes"], r)
        assert r["bound_share"] == pytest.approx(bound / r["median_s"])
    assert {r["contender"] for r in saved["e2e"]} >= {"official", "torch", "fwd_bwd", "reference"}

    def row(op, contender):
        return next(r for r in saved["rows"] if (r["op"], r["dtype"], r["contender"]) == (op, "fp32", contender))

    # the memory probe sees the official deepcopy (a whole copy of the slow weights per sync) ...
    numel = row("slow_sync_0.5", "official")["numel"]
    assert row("slow_sync_0.5", "official")["memory"]["device_bytes"] >= 4 * numel
    # ... and nothing for an in-place foreach op
    assert row("fisher", "torch")["memory"]["device_bytes"] < 4 * numel / 10

    markdown = (tmp_path / "cpu-smoke.md").read_text()
    for op in OPS:
        assert f"### `{op}`" in markdown
    assert "## End to end" in markdown and "## Same math" in markdown
    assert (tmp_path / "cpu-smoke.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (tmp_path / "cpu-smoke-summary.md").read_text()
    assert "## End to end" in summary and "### `" not in summary
    assert "wrote" in capsys.readouterr().out


def _fake_results(device, rows):
    roofs = {"copy_gbs": 100.0, "inplace_gbs": 50.0, "roof_gbs": 100.0 if device == "cuda" else 50.0}
    return {"meta": {"device": device}, "roofs": roofs, "unavailable": {}, "rows": rows}


def _fake_row(op, case, contender, seconds, roof_share, **extra):
    return {"op": op, "case": case, "dtype": "fp32", "contender": contender, "median_s": seconds, "numel": 1 << 24,
            "roof_share": roof_share, **extra}


def test_cpu_targets_are_judged_from_the_measured_rows():
    results = _fake_results("cpu", [
        _fake_row("forget_full", "flat", "fused", 0.010, 0.85),
        _fake_row("forget_full", "flat", "foreach", 0.014, 0.6),
        _fake_row("fisher", "flat", "fused", 0.010, 0.70, bound_share=0.93),
    ])
    rows = {r[0]: r for r in report.targets(results)}
    assert rows["C++ `forget_full` bandwidth, flat 16,777,216, fp32"][3] == "met"
    assert rows["C++ `fisher` bandwidth, flat 16,777,216, fp32"][1] == "70 % of in-place (93 % of its stream bound)"
    assert rows["C++ `fisher` bandwidth, flat 16,777,216, fp32"][3] == "**not met**"
    speedup = rows["C++ forget step (clip + momentum + wd) vs `foreach`, flat 16,777,216, fp32"]
    assert speedup[1] == "1.40×" and speedup[3] == "**not met**"


def test_cuda_targets_include_the_floor_and_the_baseline_ratios():
    results = _fake_results("cuda", [
        _fake_row("forget_full", "flat", "fused", 0.010, 0.92),
        _fake_row("forget_full", "flat", "triton", 0.0105, 0.88),
        _fake_row("forget_full", "resnet18_cifar", "fused", 0.004, 0.5, modelled_bytes=2.6e8, vs_torch=2.0,
                  vs_official=2.5),
    ])
    rows = {r[0]: r for r in report.targets(results)}
    assert rows["`triton` vs `fused` `forget_full`, flat 16,777,216, fp32"][3] == "met"
    floor = next(r for name, r in rows.items() if "byte-model floor" in name)
    assert floor[1] == "1.54×" and floor[3] == "**not met**"  # 4 ms against 2.6e8 B / 100 GB/s = 2.6 ms
    assert rows["`fused` forget step vs `torch`, resnet18_cifar, fp32"][3] == "met"
    assert rows["`fused` forget step vs `official`, resnet18_cifar, fp32"][3] == "**not met**"


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32])
@pytest.mark.parametrize("op", list(OPS))
def test_every_cuda_contender_computes_what_the_reference_computes(op, dtype):
    contenders, _ = suite.contenders("cuda")
    errors = suite.verify(op, cases.build_case("ragged", "cuda", "smoke"), dtype, "cuda", contenders)
    for name, err in errors.items():
        if name != "reference":
            assert err <= run.VERIFY_RTOL["fp32"], f"{op}: {name} differs from the reference by {err:.2e}"


@pytest.mark.gpu
@needs_cuda
def test_cuda_smoke_run(tmp_path):
    results = run.main(["--smoke", "--device", "cuda", "--out", str(tmp_path)])
    assert run.failures(results) == []
    assert results["roofs"]["roof"] == "copy" and results["roofs"]["copy_gbs"] > 0
    assert all(r["memory"]["device_bytes"] is not None for r in results["rows"])
    assert (tmp_path / "cuda-smoke.md").exists() and (tmp_path / "cuda-smoke.png").exists()


def test_host_bound_has_resnet18s_tensor_count():
    _needs_torchvision()
    assert len(host_bound.shapes()) == len(list(cases.resnet18_cifar().parameters()))


def test_resume_keeps_finished_groups_and_measures_the_rest(tmp_path):
    common = ["--smoke", "--device", "cpu", "--out", str(tmp_path), "--no-e2e", "--no-verify", "--no-memory",
              "--dtypes", "fp32"]
    first = run.main(common + ["--ops", "fisher"])
    second = run.main(common + ["--ops", "fisher,slow_sync_1", "--resume"])
    kept = {r["contender"]: r["median_s"] for r in first["rows"]}
    assert {r["contender"]: r["median_s"] for r in second["rows"] if r["op"] == "fisher"} == kept
    assert {r["op"] for r in second["rows"]} == {"fisher", "slow_sync_1"}
    assert len(second["runs"]) == 2
    assert "Collected over 2 runs" in (tmp_path / "cpu-smoke.md").read_text()


def test_diffusion_time_smoke_run_and_the_cifar_denoisers_size(tmp_path):
    pytest.importorskip("diffusers")
    from benchmarks import diffusion_time

    cifar = diffusion_time.CIFAR
    net = diffusion_time.denoiser(cifar["image_shape"], cifar["channels"], cifar["attention"])
    assert sum(p.numel() for p in net.parameters()) == 35_751_939  # DDPM's CIFAR-10 denoiser, 35.7 M
    rows = diffusion_time.main(["--smoke", "--device", "cpu", "--out", str(tmp_path)])
    assert set(rows) == {"SFR-on", "SalUn"}
    for r in rows.values():
        assert set(r["seconds"]) == {1, 2} and all(t > 0 for t in r["seconds"].values())
        assert r["paper_s"] is None or r["paper_s"] > r["preparation_s"]
    assert "| SalUn | 1,000 |" in (tmp_path / "cpu-diffusion-time-smoke.md").read_text()

