"""``sfron-unlearn`` as a user runs it, in subprocesses: every mistake in the flags, the folders, the data
files, the hyperparameters or the checkpoints is one line on stderr naming it, exit status 2, before anything
trains or is written; results and checkpoints of another run are never reused or overwritten silently;
Ctrl-C stops with exit status 130, leaves a checkpoint and the same command resumes from it.

The cases that need no process of their own (more variants of the same checks, and the ``--overwrite``
path) run ``cli.main`` in-process, which is what the process runs."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sfron_ops.unlearn import cli

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("torchvision")

from test_unlearn_data import _write_cifar, _write_folder  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# one seed, one method, one epoch of training, two iterations of unlearning: a couple of seconds
TINY = ["--seeds", "0", "--methods", "SFR-on", "--epochs", "1", "--set", "*.iterations=2", "--no-progress",
        "--threads", "1"]

pytestmark = pytest.mark.usefixtures("one_thread")
# the runs behind the checkpoint tests are stopped with SIGINT, as a terminal's Ctrl-C does
needs_sigint = pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child process is POSIX")


def _env():
    path = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=str(ROOT) + (os.pathsep + path if path else ""), OMP_NUM_THREADS="1")


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "sfron_ops.unlearn", *map(str, args)], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=300)


def _usage_error(proc, *names):
    """Exit status 2 and one line on stderr (no traceback) that contains every one of ``names``."""
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sfron-unlearn: error: "), proc.stderr
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


# ---------------------------------------------------------------------------------------------- flags
@pytest.mark.parametrize("flags, names", [
    (["--threads", "0"], ["--threads", "0"]),
    (["--epochs", "0"], ["--epochs", "0"]),  # used to train 40 epochs
])
def test_bad_flag_is_one_line_and_nothing_runs(tmp_path, flags, names):
    out = tmp_path / "out"
    _usage_error(_cli("run", *flags, "--out", out, "--seeds", "0", cwd=tmp_path), *names)
    assert not out.exists()


def test_forget_class_out_of_range(tmp_path):
    out = tmp_path / "out"
    _usage_error(_cli("run", "--forget", "class:99", "--out", out, cwd=tmp_path), "--forget class:99", "99")
    assert not out.exists()


def test_bad_hyperparameter_is_found_before_training(tmp_path):
    """A bad --set value used to surface only after the original and RT had trained."""
    out = tmp_path / "out"
    line = _usage_error(_cli("run", "--set", "SFR-on.lr=-1", "--out", out, "--seeds", "0", cwd=tmp_path),
                        "SFR-on", "lr", "-1")
    assert "--set SFR-on.lr=-1" in line
    assert not out.exists()


def test_unusable_out_is_found_before_training(tmp_path):
    """A file where --out should be a folder used to fail after the whole run, losing the results."""
    blocker = tmp_path / "results"
    blocker.write_text("my notes")
    _usage_error(_cli("run", *TINY, "--out", blocker / "digits", cwd=tmp_path), "--out", str(blocker))
    assert blocker.read_text() == "my notes"


# ---------------------------------------------------------------------------------------------- data files
def _cifar_args(root, out):
    return ["run", "--dataset", "cifar10", "--root", root, "--model", "mlp", *TINY, "--out", out]


def test_corrupt_cifar_file(tmp_path):
    root = tmp_path / "data"
    _write_cifar(str(root), "cifar10")
    batch = root / "cifar-10-batches-py" / "data_batch_2"
    batch.write_bytes(batch.read_bytes()[:200])
    out = tmp_path / "out"
    _usage_error(_cli(*_cifar_args(root, out), cwd=tmp_path), str(batch), "not a readable cifar10 file")
    assert not out.exists()


def test_non_image_file_in_an_image_folder(tmp_path):
    train, test = tmp_path / "train", tmp_path / "val"
    _write_folder(str(train), ["ant", "bee"], 3)
    _write_folder(str(test), ["ant", "bee"], 2)
    bad = train / "bee" / "1.png"
    bad.write_text("this is not a picture")
    out = tmp_path / "out"
    _usage_error(_cli("run", "--dataset", "imagefolder", "--root", train, "--test-root", test, "--model", "mlp",
                      *TINY, "--out", out, cwd=tmp_path), str(bad), "not a readable image")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------- Ctrl-C, resume
def _interrupt_during_training(args, cwd):
    """Start the CLI with -v, send SIGINT once the first training record is logged, return (proc, stderr)."""
    proc = subprocess.Popen([sys.executable, "-m", "sfron_ops.unlearn", *map(str, args), "-v"], cwd=cwd, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if re.match(r"train \d+/\d+ ", line):
            proc.send_signal(signal.SIGINT)
            break
    rest, err = proc.communicate(timeout=300)
    return proc, "".join(lines) + err


@pytest.fixture(scope="module")
def interrupted_then_resumed(tmp_path_factory):
    """A digits run stopped by Ctrl-C while the original trains, then the same command again."""
    cwd = tmp_path_factory.mktemp("ctrl_c")
    flags = ["run", "--seeds", "0", "--methods", "SFR-on", "--set", "*.iterations=4", "--epochs", "20",
             "--no-progress", "--threads", "1"]
    args = [*flags, "--out", cwd / "out"]
    stopped, stopped_err = _interrupt_during_training(args, cwd)
    saved = {}
    match = re.search(r"stopped after iteration (\d+)/\d+, saved to (\S+);", stopped_err)
    if match:
        saved = torch.load(match.group(2), weights_only=True, map_location="cpu")
    results_after_stop = (cwd / "out" / "results.json").exists()
    resumed = _cli(*args, "-v", cwd=cwd)
    return dict(cwd=cwd, flags=flags, out=cwd / "out", stopped=stopped, stopped_err=stopped_err, match=match,
                saved=saved, results_after_stop=results_after_stop, resumed=resumed)


@pytest.mark.slow
@needs_sigint
def test_ctrl_c_stops_cleanly_and_the_same_command_resumes(interrupted_then_resumed, tmp_path):
    run = interrupted_then_resumed
    assert run["stopped"].returncode == 130, run["stopped_err"]
    last = run["stopped_err"].strip().splitlines()[-1]
    assert "Traceback" not in run["stopped_err"]
    assert re.match(r"sfron-unlearn: interrupted: (original|RT) s0 stopped after iteration ", last), last
    assert f"run the same command to resume from the checkpoints in {run['out'] / 'checkpoints'}" in last
    assert run["match"], last
    # the checkpoint holds the iteration the message names, and the run is not marked finished
    assert run["saved"]["iteration"] == int(run["match"].group(1)) and not run["saved"]["finished"]
    assert not run["results_after_stop"]

    resumed = run["resumed"]
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {run['match'].group(2)} at iteration {run['match'].group(1)}/" in resumed.stderr
    # the resumed run ends where an uninterrupted one ends
    whole = tmp_path / "whole"
    assert cli.main([*run["flags"], "--out", str(whole)]) == 0
    got = json.loads((run["out"] / "results.json").read_text())["per_seed"]["0"]
    want = json.loads((whole / "results.json").read_text())["per_seed"]["0"]
    for label in want:
        for key in ("FA", "RA", "TA", "MIA", "KL", "JS"):
            assert got[label][key] == want[label][key], (label, key)


# ---------------------------------------------------------------------------------------------- finished runs
def _copy_of(run, tmp_path):
    """The finished run's folder copied to ``tmp_path / "out"``, and its command line writing there."""
    out = tmp_path / "out"
    shutil.copytree(run["out"], out)
    return out, [*run["flags"], "--out", out]


@pytest.mark.slow
@needs_sigint
def test_existing_results_are_not_overwritten(interrupted_then_resumed, tmp_path):
    out, args = _copy_of(interrupted_then_resumed, tmp_path)
    before = (out / "results.json").read_bytes()
    _usage_error(_cli(*args, cwd=tmp_path), f"--out {out} already holds results.json", "--overwrite")
    assert (out / "results.json").read_bytes() == before


@pytest.mark.slow
@needs_sigint
def test_checkpoints_of_another_forget_set_are_refused(interrupted_then_resumed, tmp_path):
    """A folder written for random:0.1 used to be reused for random:0.11 (RT's FA 36.5 instead of 27.0)."""
    out, _ = _copy_of(interrupted_then_resumed, tmp_path)
    before = {p.name: p.read_bytes() for p in (out / "checkpoints" / "seed0").iterdir()}
    proc = _cli(*interrupted_then_resumed["flags"], "--forget", "random:0.11", "--out", tmp_path / "other",
                "--checkpoint-dir", out / "checkpoints", cwd=tmp_path)
    line = _usage_error(proc, str(out / "checkpoints" / "seed0" / "RT.pt"), "forget.fraction=0.1 there",
                        "forget.fraction=0.11 here", "--overwrite")
    assert "original.pt" not in line  # the original does not depend on the forget set
    assert {p.name: p.read_bytes() for p in (out / "checkpoints" / "seed0").iterdir()} == before


@pytest.mark.slow
@needs_sigint
def test_corrupt_checkpoint(interrupted_then_resumed, tmp_path):
    out, _ = _copy_of(interrupted_then_resumed, tmp_path)
    ckpt = out / "checkpoints" / "seed0" / "SFR-on.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    proc = _cli(*interrupted_then_resumed["flags"], "--out", tmp_path / "other", "--checkpoint-dir",
                out / "checkpoints", cwd=tmp_path)
    _usage_error(proc, str(ckpt), "cannot be read", "--overwrite")
    assert len(ckpt.read_bytes()) == 1000 and not (tmp_path / "other").exists()


# ---------------------------------------------------------------------------------------------- in-process
def _main_error(argv, capsys, *names):
    """``cli.main`` returns 2 and prints one line naming every one of ``names``."""
    capsys.readouterr()
    assert cli.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sfron-unlearn: error: "), err
    for name in names:
        assert name in err[0], (name, err[0])
    return err[0]


@pytest.mark.parametrize("flags, names", [
    (["--threads", "-2"], ["--threads", "-2"]),
    (["--threads", "two"], ["--threads", "two"]),
    (["--batch-size", "0"], ["--batch-size", "0"]),
    (["--num-workers", "1"], ["--num-workers", "digits"]),
    (["--seeds", "1", "1"], ["--seeds", "1 1"]),
    (["--seeds", "-3"], ["--seeds", "-3"]),
    (["--forget", "random:1.5"], ["--forget random:1.5"]),
    (["--forget", "random:0"], ["--forget random:0"]),
    (["--forget", "random:nan"], ["--forget random:nan"]),
    (["--forget", "class:-1"], ["--forget class:-1"]),
    (["--forget", "half"], ["--forget", "half"]),
    (["--scenario", "digits-random", "--forget", "class:2"], ["--forget class:2", "digits-random"]),
    (["--set", "lr=1"], ["--set", "lr=1"]),
    (["--set", "XX.lr=1"], ["--set", "XX"]),
    (["--set", "SFR-on.lr=NaN"], ["--set", "SFR-on.lr=NaN", "finite"]),
    (["--set", "SFR-on.bogus=1"], ["SFR-on", "bogus", "--set SFR-on.bogus=1"]),
    (["--set", "*.iterations=0"], ["iterations", "--set *.iterations=0"]),
    (["--set", "SFR-on.impl=nope"], ["SFR-on", "impl", "nope"]),
    (["--methods", "FT,XX"], ["--methods", "XX"]),
    (["--methods", "FT", "--set", "SCRUB.lr=1"], ["--set", "SCRUB", "--methods FT"]),
    (["--device", "nowhere"], ["--device nowhere"]),
    (["--root", "data"], ["--root", "digits"]),
    (["--dataset", "cifar10"], ["--dataset cifar10 needs --root"]),
    (["--dataset", "imagefolder", "--root", "train"], ["--test-root"]),
    (["--dataset", "cifar10", "--root", "data", "--scenario", "digits-class"], ["--scenario digits-class"]),
    (["--no-checkpoints", "--checkpoint-dir", "ck"], ["--no-checkpoints", "--checkpoint-dir"]),
])
def test_more_flag_mistakes(tmp_path, capsys, flags, names):
    out = tmp_path / "out"
    _main_error(["run", *flags, "--out", out] + ([] if "--seeds" in flags else ["--seeds", "0"]), capsys, *names)
    assert not out.exists()


def test_missing_cifar_file_and_other_folder_mistakes(tmp_path, capsys):
    root = tmp_path / "data"
    _write_cifar(str(root), "cifar10")
    (root / "cifar-10-batches-py" / "data_batch_4").unlink()
    _main_error(_cifar_args(root, tmp_path / "out"), capsys, str(root / "cifar-10-batches-py" / "data_batch_4"))
    _main_error(_cifar_args(tmp_path / "nowhere", tmp_path / "out"), capsys, str(tmp_path / "nowhere"))
    train, test = tmp_path / "train", tmp_path / "val"
    _write_folder(str(train), ["ant", "bee"], 2)
    _write_folder(str(test), ["ant", "cat"], 1)
    _main_error(["run", "--dataset", "imagefolder", "--root", train, "--test-root", test, *TINY, "--out",
                 tmp_path / "out"], capsys, f"test_root={str(test)!r}", "classes")
    (test / "cat").rename(test / "bee")
    for f in (train / "bee").iterdir():
        f.rename(f.with_suffix(".txt"))  # a class folder with no image left
    _main_error(["run", "--dataset", "imagefolder", "--root", train, "--test-root", test, *TINY, "--out",
                 tmp_path / "out"], capsys, f"train_root={str(train)!r}", "bee")
    assert not (tmp_path / "out").exists()
    _main_error(["run", *TINY, "--checkpoint-dir", root / "cifar-10-batches-py" / "test_batch", "--out",
                 tmp_path / "out"], capsys, "--checkpoint-dir", "not a folder")


def test_overwrite_replaces_only_what_belongs_to_another_run(tmp_path, capsys):
    """random:0.1, then random:0.11 in the same folder: refused, naming the forget set; with --overwrite the
    results and RT's and SFR-on's checkpoints are replaced, and the original (which does not depend on the
    forget set) is resumed as it is."""
    out = tmp_path / "out"
    ckpts = out / "checkpoints" / "seed0"
    assert cli.main(["run", *TINY, "--out", str(out)]) == 0
    first = {p.name: p.read_bytes() for p in ckpts.iterdir()}
    results = (out / "results.json").read_bytes()
    eleven = ["run", *TINY, "--forget", "random:0.11", "--out", out]
    _main_error(eleven, capsys, "results.json", "--overwrite")
    assert (out / "results.json").read_bytes() == results
    assert cli.main([str(a) for a in eleven] + ["--overwrite"]) == 0
    second = {p.name: p.read_bytes() for p in ckpts.iterdir()}
    assert second["original.pt"] == first["original.pt"]
    assert second["RT.pt"] != first["RT.pt"] and second["SFR-on.pt"] != first["SFR-on.pt"]
    rt = torch.load(ckpts / "RT.pt", weights_only=True)["key"]["forget"]
    assert rt["fraction"] == 0.11 and rt["count"] == round(0.11 * 1347)
    assert json.loads((out / "results.json").read_text())["description"].startswith("digits (sklearn), 11%")
    # the same command again: everything is there, so only the results are in the way
    _main_error(eleven, capsys, "results.json")


def test_tune_applies_set_to_every_configuration(tmp_path):
    args = cli.build_parser().parse_args(["tune", "--methods", "FT,GA", "--set", "*.iterations=3", "--set",
                                          "GA.lr=0.5", "--seeds", "1", "--out", str(tmp_path / "tune")])
    plan = cli.prepare(args)
    assert set(plan.grids) == {"FT", "GA"}
    assert all(c["iterations"] == 3 for grid in plan.grids.values() for c in grid)
    assert all(c["lr"] == 0.5 for c in plan.grids["GA"]) and len(plan.grids["GA"]) == 18


# ---------------------------------------------------------------------------------------------- diffusion scenario
DDPM = ["run", "--scenario", "digits-ddpm-class"]


@pytest.mark.parametrize("flags, names", [
    (["--forget", "random:0.1"], ["--forget", "digits-ddpm-class", "class:INDEX[,INDEX...]", "random:0.1"]),
    (["--model", "cnn"], ["--model cnn", "mlp, unet, dit"]),
    (["--epochs", "3"], ["--epochs", "digits-ddpm-class", "iterations"]),
    (["--epochs", "0"], ["--epochs", "digits-ddpm-class"]),
])
def test_ddpm_flag_mistakes_are_one_line(tmp_path, flags, names):
    out = tmp_path / "out"
    _usage_error(_cli(*DDPM, *flags, "--seeds", "0", "--out", out, cwd=tmp_path), *names)
    assert not out.exists()


def test_ddpm_results_are_not_overwritten(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text("my results")
    _usage_error(_cli(*DDPM, "--forget", "class:2", "--seeds", "0", "--out", out, cwd=tmp_path),
                 f"--out {out} already holds results.json", "--overwrite")
    assert (out / "results.json").read_text() == "my results"
    assert sorted(p.name for p in out.iterdir()) == ["results.json"]  # no checkpoint folder either


@pytest.mark.parametrize("flags, names", [
    (["--forget", "class:12"], ["--forget class:12", "12", "digits"]),
    (["--forget", "class:1,1"], ["--forget class:1,1", "repeats"]),
    (["--forget", "class"], ["--forget", "class:INDEX"]),
    (["--forget", "class:1,x"], ["--forget class:1,x"]),
    (["--dataset", "cifar10", "--root", "data"], ["digits-ddpm-class", "--dataset cifar10"]),
    (["--num-workers", "1"], ["--num-workers"]),
    (["--methods", "SFR-on,XX"], ["--methods", "XX"]),
    (["--methods", "SFR-on", "--set", "SalUn.lr=1"], ["--set", "SalUn", "--methods SFR-on"]),
    (["--set", "SFR-on.lr=-1"], ["SFR-on", "lr", "-1", "--set SFR-on.lr=-1"]),
    (["--set", "SA.replay_per_class=0"], ["SA", "replay_per_class", "--set SA.replay_per_class=0"]),
])
def test_more_ddpm_flag_mistakes(tmp_path, capsys, flags, names):
    out = tmp_path / "out"
    _main_error([*DDPM, *flags, "--seeds", "0", "--out", out], capsys, *names)
    assert not out.exists()


def test_a_list_of_classes_is_for_the_diffusion_scenario(tmp_path, capsys):
    _main_error(["run", "--scenario", "digits-class", "--forget", "class:1,2", "--seeds", "0", "--out",
                 tmp_path / "out"], capsys, "--forget class:1,2", "digits-ddpm-class")
    _main_error(["run", "--model", "unet", "--seeds", "0", "--out", tmp_path / "out"], capsys, "--model unet",
                "mlp, cnn, resnet18")
    assert not (tmp_path / "out").exists()


def test_ddpm_plan_takes_the_classes_denoiser_and_rt(tmp_path):
    args = cli.build_parser().parse_args([*DDPM, "--forget", "class:3,7", "--methods", "RT,SFR-on", "--seeds", "4",
                                          "--batch-size", "32", "--out", str(tmp_path / "out")])
    plan = cli.prepare(args)
    assert plan.scenario.classes == (3, 7) and plan.scenario.batch_size == 32 and plan.labels == ["RT", "SFR-on"]
    assert plan.checkpoint_dir == str(tmp_path / "out" / "checkpoints") and plan.stale == []
    tune = cli.prepare(cli.build_parser().parse_args(["tune", "--scenario", "digits-ddpm-class", "--methods", "GA",
                                                      "--set", "*.iterations=7", "--out", str(tmp_path / "t")]))
    assert plan.scenario.name == tune.scenario.name and tune.seeds == list(tune.scenario.tuning_seeds)
    assert [c["iterations"] for c in tune.grids["GA"]] == [7, 7, 7]
    (tmp_path / "t" / "tuning.json").write_text("{}")
    with pytest.raises(cli.UsageError, match="tuning.json"):
        cli.prepare(cli.build_parser().parse_args(["tune", "--scenario", "digits-ddpm-class", "--out",
                                                   str(tmp_path / "t")]))


@pytest.fixture
def tiny_ddpm(monkeypatch):
    """``digits-ddpm-class`` on budgets of a few iterations and images, as the command line builds it."""
    from sfron_ops.unlearn import presets

    real = presets.digits_ddpm_scenario

    def tiny(**kw):
        methods = {"SFR-on": dict(presets.DIGITS_DDPM["SFR-on"], iterations=4),
                   "GA": dict(presets.DIGITS_DDPM["GA"], iterations=4)}
        return real(methods=methods, train=dict(presets.DDPM_TRAIN, iterations=6), classifier_epochs=1,
                    samples_forget=6, samples_kept=3, sample_steps=2, trace_points=2, trace_samples=4,
                    judge_non_digits=60, denoiser_kwargs=dict(width=32, depth=1, emb=16), **kw)

    monkeypatch.setattr(presets, "digits_ddpm_scenario", tiny)


TINY_DDPM = [*DDPM, "--seeds", "0", "--methods", "SFR-on", "--no-progress", "--threads", "1"]


def test_ddpm_checkpoints_of_another_class_or_config_are_refused(tmp_path, capsys, tiny_ddpm):
    """Checkpoints and judged cases carry the class and the hyperparameters, not only their file names: one of
    class 2 under class 3's name is refused, and so is a judged case of another learning rate (the judged cases
    used to be reused whatever the hyperparameters)."""
    out, ck = tmp_path / "out", tmp_path / "out" / "checkpoints" / "seed0"
    assert cli.main([*TINY_DDPM, "--forget", "class:2", "--out", str(out)]) == 0
    assert {p.name for p in ck.iterdir()} == {"judge.pt", "original.pt", "SFR-on-c2.pt", "case-c2.json"}
    before = {p.name: p.read_bytes() for p in ck.iterdir()}

    shutil.copy(ck / "SFR-on-c2.pt", ck / "SFR-on-c3.pt")
    three = [*TINY_DDPM, "--forget", "class:3", "--out", tmp_path / "three", "--checkpoint-dir", out / "checkpoints"]
    _main_error(three, capsys, str(ck / "SFR-on-c3.pt"), "forget.forget_class=2 there", "forget.forget_class=3 here",
                "--overwrite")
    assert not (tmp_path / "three").exists()
    (ck / "SFR-on-c3.pt").unlink()

    lr = [*TINY_DDPM, "--forget", "class:2", "--set", "SFR-on.lr=0.002", "--out", tmp_path / "lr",
          "--checkpoint-dir", out / "checkpoints"]
    _main_error(lr, capsys, str(ck / "SFR-on-c2.pt"), "hparams.lr=0.001 there", "hparams.lr=0.002 here")
    (ck / "SFR-on-c2.pt").unlink()  # the judged case alone still knows which run it judged
    _main_error(lr, capsys, str(ck / "case-c2.json"), "SFR-on.hparams.lr=0.001 there")
    assert {p.name: p.read_bytes() for p in ck.iterdir()} == {k: v for k, v in before.items() if k != "SFR-on-c2.pt"}
    assert not (tmp_path / "lr").exists()

    # --overwrite replaces the judged case; the judge and the original (any class, any method) are resumed as they are
    assert cli.main([str(a) for a in lr] + ["--overwrite"]) == 0
    after = {p.name: p.read_bytes() for p in ck.iterdir()}
    assert after["judge.pt"] == before["judge.pt"] and after["original.pt"] == before["original.pt"]
    case = json.loads((ck / "case-c2.json").read_text())
    assert case["key"]["SFR-on"]["hparams"]["lr"] == 0.002 and case["key"]["SFR-on"]["forget"]["forget_class"] == 2
    # another class in the same folder shares the judge and the original, and keeps the judged class 2
    assert cli.main([*TINY_DDPM, "--forget", "class:3", "--set", "SFR-on.lr=0.002", "--out", str(tmp_path / "3"),
                     "--checkpoint-dir", str(out / "checkpoints")]) == 0
    assert (ck / "case-c2.json").read_bytes() == after["case-c2.json"] and (ck / "case-c3.json").exists()


def test_ddpm_ctrl_c_resumes_with_the_same_results(tmp_path, capsys, tiny_ddpm, monkeypatch):
    """Ctrl-C in the middle of an unlearning run: exit status 130, one line naming the checkpoint, and the same
    command ends with the numbers of an uninterrupted run, the FA measured during the run included."""
    from sfron_ops.unlearn import generation

    whole = tmp_path / "whole"
    assert cli.main([*TINY_DDPM, "--forget", "class:5", "--out", str(whole)]) == 0
    real, fired = generation._fa_trace, []

    def interrupting(*args):
        callback, every = real(*args)

        def once(i, model):
            if not fired:  # the run stops at the end of the next iteration
                fired.append(i)
                os.kill(os.getpid(), signal.SIGINT)
            return callback(i, model)

        return once, every

    monkeypatch.setattr(generation, "_fa_trace", interrupting)
    out = tmp_path / "out"
    args = [*TINY_DDPM, "--forget", "class:5", "--out", str(out)]
    capsys.readouterr()
    assert cli.main(args) == 130
    err = capsys.readouterr().err.strip().splitlines()
    ckpt = out / "checkpoints" / "seed0" / "SFR-on-c5.pt"
    assert err[-1] == (f"sfron-unlearn: interrupted: SFR-on s0 c5 stopped after iteration 3/4, saved to {ckpt}; run "
                       f"the same command to resume from the checkpoints in {out / 'checkpoints'}"), err
    assert fired == [2] and not (out / "results.json").exists()
    assert cli.main(args) == 0
    got, want = (json.loads((d / "results.json").read_text())["per_case"]["0/5"]["SFR-on"] for d in (out, whole))
    assert [i for i, _ in got["fa_trace"]] == [2, 4]
    for key in ("FA", "FA prob", "kept acc", "FID", "fa_trace", "forget_at", "iterations"):
        assert got[key] == want[key], key


@pytest.mark.slow
@needs_sigint
def test_ddpm_ctrl_c_in_a_terminal(tmp_path):
    """SIGINT while the judge trains (the full preset): exit status 130 and one line that names the checkpoint it
    saved; the same command, and the same with another class (the judge is shared), accept that checkpoint."""
    out = tmp_path / "out"
    args = [*DDPM, "--forget", "class:2", "--seeds", "0", "--methods", "SFR-on", "--no-progress", "--threads", "1",
            "--out", out]
    proc, err = _interrupt_during_training(args, tmp_path)
    assert proc.returncode == 130 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    ckpt = out / "checkpoints" / "seed0" / "judge.pt"
    match = re.fullmatch(rf"sfron-unlearn: interrupted: judge s0 stopped after iteration (\d+)/620, saved to "
                         rf"{re.escape(str(ckpt))}; run the same command to resume from the checkpoints in "
                         rf"{re.escape(str(out / 'checkpoints'))}", last)
    assert match, last
    saved = torch.load(ckpt, weights_only=True)
    assert saved["iteration"] == int(match.group(1)) and not saved["finished"] and saved["key"]["run"] == "judge"
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["judge.pt"] and not (out / "results.json").exists()
    for forget in ("class:2", "class:3"):  # the last --forget counts
        assert cli.prepare(cli.build_parser().parse_args([str(a) for a in args] + ["--forget", forget])).stale == []
