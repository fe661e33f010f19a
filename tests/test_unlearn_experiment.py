"""Scenarios end to end: the CLI, outputs, tuning, experiment-level resume, and the demo's quality bar."""

import json
import os
import shutil

import pytest
import torch

from sfron_ops import demo
from sfron_ops.unlearn import cli, experiment, presets
from sfron_ops.unlearn.checkpoints import CheckpointError

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(mode="random", methods=("FT", "SFR-on")):
    scenario = presets.digits_scenario(mode, epochs=2)
    scenario.methods = {k: dict(v, iterations=4) for k, v in scenario.methods.items() if k in methods}
    return scenario


def test_cli_run_writes_table_json_and_plot(tmp_path, capsys):
    out = str(tmp_path / "out")
    code = cli.main(["run", "--scenario", "digits-random", "--epochs", "2", "--set", "*.iterations=4", "--seeds", "0",
                     "--methods", "FT,SFR-on", "--out", out, "--no-progress", "--threads", "1"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "SFR-on" in printed and "Avg.D" in printed
    with open(os.path.join(out, "results.json")) as fh:
        results = json.load(fh)
    assert results["order"] == ["Original", "RT", "FT", "SFR-on"]
    assert results["summary"]["RT"]["Avg.D"] == [0.0, 0.0]
    assert results["methods"]["SFR-on"]["iterations"] == 4
    row = results["per_seed"]["0"]["SFR-on"]
    assert set(experiment.METRIC_KEYS) <= set(row) and row["RTE"] > 0
    assert row["Avg.D"] == pytest.approx(sum(abs(row[k] - results["per_seed"]["0"]["RT"][k])
                                             for k in ("FA", "RA", "TA", "MIA")) / 4)
    with open(os.path.join(out, "table.md")) as fh:
        table = fh.read()
    assert "| SFR-on |" in table and "| Method |" in table
    assert os.path.getsize(os.path.join(out, "results.png")) > 10_000


def test_cli_presets_and_errors(capsys):
    assert cli.main(["presets"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["sfron_paper"]["cifar10-random"]["forget_alpha"] == 25.0
    for argv, message in ((["run", "--set", "lr=1", "--seeds", "0"], "LABEL.key=value"),
                          (["run", "--set", "XX.lr=1", "--seeds", "0"], "no method 'XX'"),
                          (["run", "--dataset", "cifar10", "--seeds", "0"], "needs --root")):
        assert cli.main(argv) == 2
        assert message in capsys.readouterr().err


def test_paper_presets_are_valid_methods():
    from sfron_ops.unlearn import make_method

    for preset in list(presets.SFRON_PAPER.values()) + list(presets.DIGITS_RANDOM.values()) + \
            list(presets.DIGITS_CLASS.values()) + [p for kind in ("random", "class")
                                                   for p in presets._paper_methods(kind).values()]:
        spec = dict(preset)
        make_method(spec.pop("method"), **spec)
    cifar = presets.SFRON_PAPER["cifar10-random"]
    assert (cifar["lr"], cifar["iterations"], cifar["forget_freq"], cifar["max_grad_norm"]) == (0.01, 1500, 5, 7.0)
    tiny = presets.SFRON_PAPER["tinyimagenet-random"]
    assert (tiny["base"], tiny["lr"], tiny["weight_decay"], tiny["forget_alpha"], tiny["lambd"]) == \
        ("adamw", 2e-5, 0.05, 500.0, 0.6)
    assert all(len(g) == 18 for g in presets.TUNING_GRIDS.values())
    assert all(c["iterations"] <= 60 for g in presets.TUNING_GRIDS.values() for c in g)
    # class-wise tuning sees every class once (class = seed mod 10), and never a reported seed
    assert sorted(s % 10 for s in presets.TUNING_SEEDS["class"]) == list(range(10))
    assert not set(presets.TUNING_SEEDS["class"] + presets.TUNING_SEEDS["random"]) & {0, 1, 2}
    assert presets.digits_scenario("class").tuning_max_fa == 1.0
    assert presets.digits_scenario("random").tuning_max_fa is None


def test_tune_picks_the_lowest_avg_gap():
    scenario = _tiny(methods=())
    grids = {"FT": [dict(method="ft", iterations=4, lr=0.0), dict(method="ft", iterations=4, lr=0.5)]}
    result = experiment.tune(scenario, grids, seeds=(3,), echo=lambda s: None)
    scores = [t["Avg.D"] for t in result["trials"]]
    assert result["best"]["FT"] == grids["FT"][scores.index(min(scores))]
    assert len(result["trials"]) == 2


def test_tune_eligibility_by_forget_accuracy(monkeypatch):
    """Hand-made metrics per (config, seed): only configurations with FA <= max_fa on every seed are
    eligible; with none eligible the lowest Avg.D wins; a NaN FA is never eligible."""
    table = {  # lr -> [(Avg.D, FA) per seed]
        1: [(1.0, 0.0), (1.0, 5.0)],            # lowest Avg.D, but leaves 5 % on one seed
        2: [(2.0, 0.0), (2.0, 0.5)],            # forgets on both seeds
        3: [(0.1, float("nan")), (0.1, 0.0)],   # NaN FA on one seed
        4: [(3.0, 0.0), (3.0, 0.0)],
    }
    monkeypatch.setattr(experiment, "prepare_seed", lambda scenario, seed, **kw: seed)
    monkeypatch.setattr(experiment, "evaluate_method", lambda scenario, seed, label, config, **kw: dict(
        zip(("Avg.D", "FA"), table[config["lr"]][seed]), KL=0.0))
    scenario = _tiny(mode="class", methods=())
    scenario.tuning_seeds = (0, 1)
    grids = {"FT": [dict(method="ft", lr=lr) for lr in table]}
    picks = {}
    for max_fa in (1.0, 0.25, 10.0, -1.0):
        result = experiment.tune(scenario, grids, max_fa=max_fa, echo=lambda s: None)
        picks[max_fa] = result["best"]["FT"]["lr"]
        assert result["seeds"] == [0, 1] and result["max_fa"] == max_fa
        assert [t["eligible"] for t in result["trials"]] == [t["max FA"] <= max_fa for t in result["trials"]]
    assert picks == {1.0: 2, 0.25: 4, 10.0: 1, -1.0: 3}  # -1: none eligible, so the lowest Avg.D
    scenario.tuning_max_fa = None
    assert experiment.tune(scenario, grids, echo=lambda s: None)["best"]["FT"]["lr"] == 3


def test_table_and_plot_with_a_diverged_method(tmp_path, recwarn):
    """A method whose model diverged on some seed (KL = inf, std NaN) is shown as such, not as a crash."""
    rt = {"FA": 0.0, "RA": 100.0, "TA": 97.0, "MIA": 40.0, "Avg.D": 0.0, "KL": 0.0, "JS": 0.0, "RTE": 1.0}
    rows = {"RT": rt, "Original": dict(rt, FA=100.0), "GA": dict(rt, KL=float("inf"), JS=float("inf")),
            "SFR-on": dict(rt, KL=0.5)}
    results = dict(_summary(rows), scenario="digits-class")
    results["summary"]["GA"]["KL"] = (float("inf"), float("nan"))
    table = experiment.format_table(results)
    ga = next(line for line in table.splitlines() if line.startswith("| GA |"))
    assert "| inf |" in ga and "nan" not in ga
    path = tmp_path / "plot.png"
    experiment.plot_results([results], str(path))
    assert path.stat().st_size > 10_000
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_plot_names_each_panel_shows_zero_bars_and_marks_the_ceiling(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    rt = {"FA": 0.0, "RA": 100.0, "TA": 97.0, "MIA": 40.0, "Avg.D": 0.0, "KL": 0.0, "JS": 0.0, "RTE": 1.0}
    rows = {"RT": rt, "Original": dict(rt, FA=100.0), "SFR-on": dict(rt, KL=0.6, **{"Avg.D": 2.0}),
            "FT (long)": dict(rt, KL=0.3, **{"Avg.D": 1.0})}
    results = dict(_summary(rows), scenario="digits-class")
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    experiment.plot_results([results], str(tmp_path / "plot.png"), past_ceiling=("FT (long)",))
    (fig,) = figures
    axes = fig.axes
    assert all(ax.get_title().startswith("digits-class: ") for ax in axes)
    # every FA is 0: each gets a mark on the axis in FA's colour
    fa_color = axes[0].get_legend().legend_handles[0].get_facecolor()
    zero_marks = [ln for ln in axes[0].lines if list(ln.get_ydata()) == [0, 0] and ln.get_color() == fa_color]
    assert len(zero_marks) == 3
    for ax in axes:  # FT (long) hatched, behind a dashed line
        assert any(p.get_hatch() == "//" for p in ax.patches)
        assert any(ln.get_linestyle() == "--" for ln in ax.lines)
    assert any("FT (long), which runs past the compute ceiling" in t.get_text() for t in fig.texts)
    kl_ticks = [t.get_text() for t in axes[2].get_yticklabels()]
    assert "0.5" in kl_ticks and not any("times" in t or "^" in t for t in kl_ticks)
    plt.close(fig)


def test_run_scenario_resumes_from_its_checkpoints(tmp_path):
    scenario = _tiny(methods=("SFR-on",))
    first = experiment.run_scenario(scenario, seeds=(0,), checkpoint_dir=str(tmp_path), echo=lambda s: None)
    assert os.path.exists(tmp_path / "seed0" / "SFR-on.pt")
    assert experiment.check_runs(scenario, (0,), checkpoint_dir=str(tmp_path)) == []
    again = experiment.run_scenario(scenario, seeds=(0,), checkpoint_dir=str(tmp_path), echo=lambda s: None)
    for label in first["order"]:
        for key in ("FA", "RA", "TA", "MIA", "KL", "RTE"):
            a, b = first["per_seed"]["0"][label][key], again["per_seed"]["0"][label][key]
            assert a == b or (a != a and b != b), (label, key)
    # another forget set: RT and SFR-on are someone else's runs now; the original is not
    other = presets.digits_scenario("random", epochs=2, fraction=0.11)
    other.methods = scenario.methods
    problems = experiment.check_runs(other, (0,), checkpoint_dir=str(tmp_path))
    assert sorted(os.path.basename(p.path) for p in problems) == ["RT.pt", "SFR-on.pt"]
    assert ("forget.fraction", 0.1, 0.11) in problems[0].differences
    with pytest.raises(CheckpointError, match="RT.pt belongs to another run: forget.fraction=0.1 there"):
        experiment.run_scenario(other, seeds=(0,), checkpoint_dir=str(tmp_path), echo=lambda s: None)
    # so are runs of another seed (their files copied where that seed's go) or another training length
    shutil.copytree(tmp_path / "seed0", tmp_path / "seed1")
    longer = presets.digits_scenario("random", epochs=3)
    longer.methods = scenario.methods
    for changed, seed, entry in ((scenario, 1, "seed"), (longer, 0, "training.epochs")):
        found = experiment.check_runs(changed, (seed,), checkpoint_dir=str(tmp_path))
        assert len(found) == 3 and all(entry in [d[0] for d in p.differences] for p in found)


def test_check_runs_names_the_run_with_a_bad_hyperparameter():
    scenario = _tiny(methods=("FT", "SFR-on"))
    scenario.methods["SFR-on"]["forget_freq"] = 0
    with pytest.raises(experiment.RunConfigError, match="SFR-on: Invalid forget_freq: 0") as err:
        experiment.check_runs(scenario, (0,))
    assert err.value.tag == "SFR-on"
    scenario.methods["SFR-on"]["forget_freq"] = 2
    scenario.train["momentum"] = -1  # the original and RT
    with pytest.raises(experiment.RunConfigError, match="original: Invalid momentum: -1"):
        experiment.check_runs(scenario, (0,))


def _summary(rows):
    return {"order": ["Original", "RT"] + [r for r in rows if r != "RT"],
            "summary": {k: {m: (v, 0.0) for m, v in row.items()} for k, row in rows.items()}}


def test_demo_quality_bar_logic():
    rt = {"FA": 70.0, "RA": 100.0, "TA": 70.0, "MIA": 40.0, "Avg.D": 0.0, "KL": 0.0, "RTE": 2.0}
    random_rows = {"RT": rt, "Original": dict(rt, **{"Avg.D": 20.0, "KL": 1.0, "RTE": float("nan")}),
                   "FT": dict(rt, **{"Avg.D": 5.0, "KL": 0.5, "RTE": 0.1}),
                   "SFR-on": dict(rt, **{"Avg.D": 3.0, "KL": 0.6, "RTE": 0.1}),
                   "FT (long)": dict(rt, **{"Avg.D": 1.0, "KL": 0.2, "RTE": 0.8})}
    class_rows = {"RT": dict(rt, FA=0.0), "Original": rt, "SFR-on": dict(rt, FA=0.5, RA=98.5)}
    checks = dict((s, met) for met, s in demo.quality_bar(_summary(random_rows), _summary(class_rows)))
    assert checks["random 10 %: lowest Avg.D within the compute ceiling: SFR-on (3)"]
    assert not checks["random 10 %: lowest KL within the compute ceiling: FT (0.5)"]
    assert not checks["random 10 %: lowest Avg.D of all rows: FT (long) (1, RTE 0.80s)"]
    assert checks["random 10 %: SFR-on RTE = 5.0 % of RT's (0.100s vs 2.00s)"]
    assert checks["class-wise: SFR-on FA = 0.50 %"]
    assert not checks["class-wise: SFR-on RA 98.50 vs RT 100.00 (gap 1.50 points)"]


def test_demo_command_meets_the_quality_bar(tmp_path, capsys):
    """The README's main-job command end to end (seeds 0, 1, 2, both scenarios, shipped presets): every
    bar that is not a run-time ratio holds. (Time is a benchmark matter; the demo prints that check.)"""
    out = tmp_path / "demo"
    assert demo.main(["--out", str(out), "--no-progress"]) == 0
    assert "Quality bar:" in capsys.readouterr().out
    with open(out / "results.json") as fh:
        results = json.load(fh)
    checks = demo.quality_bar(results["digits-random"], results["digits-class"])
    untimed = [(met, sentence) for met, sentence in checks if "RTE" not in sentence]
    assert len(untimed) == 4 and all(met for met, _ in untimed), untimed
    assert (out / "results.png").stat().st_size > 10_000


@pytest.mark.parametrize("seed", [presets.TUNING_SEEDS["class"][0], 107])
def test_digits_class_preset_reproduces_its_tuning_run(seed):
    """The shipped class-wise SFR-on preset on two of its tuning seeds forgets the class (FA <= 1 %, the
    eligibility rule it was selected under) and keeps RA within 1 point of RT's. Seed 107 (class 7) is
    where the lowest-Avg.D configuration, lr 0.03, left 7.5 % of the class recognised."""
    scenario = presets.digits_scenario("class")
    scenario.methods = {"SFR-on": scenario.methods["SFR-on"]}
    result = experiment.run_scenario(scenario, seeds=(seed,), echo=lambda s: None)
    row, rt = result["per_seed"][str(seed)]["SFR-on"], result["per_seed"][str(seed)]["RT"]
    assert row["FA"] <= 1.0
    assert abs(row["RA"] - rt["RA"]) <= 1.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_scenario_on_cuda(tmp_path):
    scenario = _tiny(methods=("SFR-on", "SCRUB"))
    result = experiment.run_scenario(scenario, seeds=(0,), device="cuda", echo=lambda s: None)
    assert result["device"].startswith("cuda")
    row = result["per_seed"]["0"]["SFR-on"]
    assert 0.0 <= row["FA"] <= 100.0 and row["RTE"] > 0 and row["KL"] >= 0
