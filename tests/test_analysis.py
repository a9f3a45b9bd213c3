"""Token-level loss trajectories: the classification rule on hand-made cases, and `sabiscale
analyze` on real runs that recorded probe losses through the training loop."""
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from sabiscale_analysis.trajectories import CATEGORIES, Trajectories, classify, fractions, slopes
from conftest import BIN, fresh_run_dir, run_cli


def _traj(losses, steps=(0, 50, 100)):
    losses = np.array(losses, dtype=np.float32).T  # tokens given as rows -> (S, N)
    return Trajectories(Path("x"), np.array(steps), losses, {})


def test_categories_follow_the_slope_and_the_final_mean():
    traj = _traj([[5, 3, 1], [1, 1.5, 2], [4, 4, 4], [0.5, 0.5, 0.5], [2.1, 2.0, 2.0]])
    assert slopes(traj) == pytest.approx([-4, 1, 0, 0, -0.1], abs=1e-5)
    names = [CATEGORIES[c] for c in classify(traj, threshold=0.2)]
    # final mean = (1 + 2 + 4 + 0.5 + 2) / 5 = 1.9: the flat 4.0 is high, the flat 0.5 low, 2.0 high
    assert names == ["H->L", "L->H", "H->H", "L->L", "H->H"]
    assert [CATEGORIES[c] for c in classify(traj, threshold=5.0)][:2] == ["L->L", "H->H"]  # all flat now
    assert sum(fractions(classify(traj)).values()) == pytest.approx(1.0)


def test_a_window_classifies_from_its_own_start():
    """After a warm start only the window counts: a token learned before it is flat inside it."""
    traj = _traj([[6, 1, 1, 1], [1, 1, 3, 5]], steps=(0, 100, 150, 200))
    window = Trajectories(Path("x"), traj.steps[1:], traj.losses[1:], {})
    assert [CATEGORIES[c] for c in classify(traj)] == ["H->L", "L->H"]
    assert slopes(window) == pytest.approx([0.0, 4.0], abs=1e-5)  # progress 0..1 over steps 100..200
    assert [CATEGORIES[c] for c in classify(window)] == ["L->L", "L->H"]


@pytest.fixture(scope="module")
def probed_runs(demo_cfg, world, tmp_path_factory):
    """A masked and an all-token (clm) run of the same data and seed, probing every 5 steps."""
    from sabiscale.train.loop import train

    runs = []
    for kind in ("masked", "clm"):
        cfg = demo_cfg.model_copy(deep=True)
        cfg.output_dir = fresh_run_dir(demo_cfg, tmp_path_factory.mktemp(kind) / kind)
        cfg.loss.kind = kind
        cfg.train.max_steps, cfg.optim.warmup_steps, cfg.train.eval_batches = 12, 1, 1
        cfg.train.probe_every, cfg.train.probe_batches = 5, 2
        cfg.tracking.system_metrics = False
        train(cfg, world)
        runs.append(cfg.output_dir)
    return runs


def test_training_records_the_probe_and_analyze_compares_runs(probed_runs, tmp_path):
    masked, clm = probed_runs
    steps = sorted(int(p.stem.split("_")[1]) for p in (masked / "probe").glob("loss_*.npy"))
    assert steps == [0, 5, 10, 12]
    meta = np.load(masked / "probe" / "meta.npz")
    assert len(np.load(masked / "probe" / "loss_00000000.npy")) == len(meta["token_id"]) > 0
    assert (meta["answer_position"] >= 0).all() and (meta["answer_position"] == 0).any()

    out = tmp_path / "report"
    proc = run_cli([BIN / "sabiscale", "analyze", str(masked), str(clm), "--out", str(out)])
    report = (out / "report.md").read_text()
    assert "## Side by side" in report and "By task" in report and "By answer position" in report
    assert "Examples" in report and (out / "comparison.png").is_file() and (out / f"categories_{masked.name}.png").is_file()
    for run in (masked, clm):
        client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
        run_id = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])][0].info.run_id
        logged = {a.path for a in client.list_artifacts(run_id, "analysis")}
        assert "analysis/report.md" in logged, logged
        assert "probe/meta.npz" in {a.path for a in client.list_artifacts(run_id, "probe")}
    assert "logged to MLflow" in proc.stdout
    windowed = run_cli([BIN / "sabiscale", "analyze", str(masked), "--from-step", "5", "--out", str(tmp_path / "w"),
                        "--no-log"], cwd=masked.parent)
    assert "steps 5-12" in (tmp_path / "w" / "report.md").read_text() and "report:" in windowed.stdout
    # a committed report names its runs relative to where it was made, not by this machine's paths
    assert f"Runs: {masked.name}  " in (tmp_path / "w" / "report.md").read_text()
    # a run on prepared data shared through data.dir has no tokenizer/ of its own: its checkpoints carry it
    import shutil

    shared = tmp_path / "shared_data_run"
    shutil.copytree(masked, shared)
    shutil.rmtree(shared / "tokenizer")
    run_cli([BIN / "sabiscale", "analyze", str(shared), "--out", str(tmp_path / "s"), "--no-log"])
    assert "## shared_data_run" in (tmp_path / "s" / "report.md").read_text()


def test_runs_probed_on_different_tokens_are_not_compared(probed_runs, tmp_path):
    import shutil

    masked, _ = probed_runs
    other = tmp_path / "other"
    shutil.copytree(masked, other)
    meta = dict(np.load(other / "probe" / "meta.npz"))
    meta["token_id"] = meta["token_id"][::-1].copy()
    np.savez(other / "probe" / "meta.npz", **meta)
    from sabiscale_analysis.trajectories import write_report

    with pytest.raises(ValueError, match="probed on different tokens"):
        write_report([masked, other], tmp_path / "r")


def test_an_experiment_skips_a_finished_run_and_trains_an_unfinished_one(probed_runs, tmp_path, capsys):
    import subprocess

    from sabiscale_analysis.experiment import train_unless_done, trained

    masked, _ = probed_runs
    assert trained(masked)["step"] == 12 and trained(tmp_path) is None
    # finished: no engine is built (a missing recipe would fail if `sabiscale train` ran)
    train_unless_done(tmp_path / "no_recipe.yaml", f"output_dir={masked}", "train.max_steps=12")
    assert "already trained to step 12" in capsys.readouterr().out
    # not finished (more steps asked): it does run `sabiscale train`, which here stops at the missing recipe
    with pytest.raises(subprocess.CalledProcessError):
        train_unless_done(tmp_path / "no_recipe.yaml", f"output_dir={masked}", "train.max_steps=20")


def test_the_best_model_page_calls_a_slice_better_only_when_its_whole_interval_clears_the_baseline():
    """exp_best_model's rule on a report shaped as heldout_scores writes it: sentiment against the
    majority label, translation against the copy baseline's interval, NER against tagging nothing."""
    from sabiscale_analysis.exp_best_model import page, verdict

    report = {
        "sentiment": {
            "sentiment/hau": {"n": 500, "rank_macro_f1": 0.45, "rank_macro_f1_ci": [0.41, 0.49],
                              "majority_label": "negative", "majority_macro_f1": 0.22},
            "sentiment/pcm": {"n": 400, "rank_macro_f1": 0.30, "rank_macro_f1_ci": [0.25, 0.35],
                              "majority_label": "negative", "majority_macro_f1": 0.27}},
        "translation": {
            "translation/eng-yor": {"examples": 200, "chrf": 18.0, "chrf_ci": [16.0, 20.0],
                                    "copy_source_chrf": 14.0, "copy_source_chrf_ci": [13.0, 15.0]},
            "translation/eng-pcm": {"examples": 200, "chrf": 30.0, "chrf_ci": [28.0, 32.0],
                                    "copy_source_chrf": 29.0, "copy_source_chrf_ci": [27.5, 30.5]}},
        "answer_loss": {"sentiment": {"records": 10, "nats_per_token": 1.2}},
        "ner": {"ner/yor": {"examples": 200, "entity_f1": 0.0, "entity_f1_ci": [0.0, 0.0], "unparsed": 12}}}
    lines, wins = page(report)
    assert wins == {"sentiment/hau": True, "sentiment/pcm": False, "translation/eng-yor": True,
                    "translation/eng-pcm": False, "ner/yor": False}
    assert "| sentiment/hau | 500 | 45.0 [41.0, 49.0] | negative | 22.0 | yes |" in lines
    assert any(line.startswith("| ner/yor |") and line.endswith("| 88.1 |") for line in lines)
    said = verdict(wins)
    assert "on 2 of 5 slices (sentiment/hau, translation/eng-yor)" in said
    assert "does not on ner/yor, sentiment/pcm, translation/eng-pcm" in said


def test_a_replaced_rho1_set_is_reported_from_its_commit_and_not_pooled():
    """The fp32 set of exp_rho1_continued (its runs gone with their machine) is read back from the
    commit that holds its page, with its own verdict; a commit this clone lacks is said to be missing."""
    import subprocess

    from sabiscale_analysis.exp_rho1_continued import FP32_SET, EarlierSet, Scale, earlier_set_lines
    from sabiscale_analysis.experiment import ROOT

    if subprocess.run(["git", "cat-file", "-e", f"{FP32_SET.commit}^{{commit}}"], cwd=ROOT).returncode != 0:
        pytest.skip(f"this clone does not hold commit {FP32_SET.commit} (a shallow clone)")
    lines = earlier_set_lines(Scale(earlier_sets=[FP32_SET, EarlierSet("0" * 40, "nowhere")]))
    text = "\n".join(lines)
    assert "trained in fp32" in text and "base 1.9949, reference 1.8853 (gain +0.1096)" in text
    assert "all tokens 1.9041/1.9006 (seeds 1, 2)" in text and "sampled 0.6 T=1 1.9033 (seed 1)" in text
    assert "- Its verdict (selective 0.6 vs all tokens): No effect of interest" in text
    assert "[-0.0477, +0.0414]" in text
    assert "- Its verdict (sampled 0.6 T=1 vs all tokens): not yet two paired seeds." in text
    assert lines[-1].endswith("that commit is not in this clone's history.\n")
