"""A mix drawn at load time by a schedule of phases (data.mix.schedule): real demo shards written
per source by `prepare`, read back through the loader the training loop uses."""
from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from conftest import ROOT, tiny_overrides
from sabiscale.config import load_config
from sabiscale.data.batch import Vocab
from sabiscale.data.loader import check_resumable, make_loader
from sabiscale.data.schedule import BLOCK, plan_schedule
from sabiscale.errors import UserError
from sabiscale.prep.prepare import prepare
from sabiscale.shards.format import read_manifest, split_shards

MICRO, PER_STEP = 4, 8  # 2 ranks x 1 micro-batch, or 1 rank x 2 accumulation steps
SWITCH = 2 * BLOCK // PER_STEP  # phase 2 starts after two blocks of samples
SCHEDULE = (f"data.mix.schedule=[{{start_step: 0, task_weights: {{text: 4}}}}, "
            f"{{start_step: {SWITCH}, task_weights: {{text: 0.25, translation: 3}}, language_weights: {{hau: 2}}}}]")


@pytest.fixture(scope="module")
def scheduled(tmp_path_factory):
    out = tmp_path_factory.mktemp("mixed")
    cfg = load_config(ROOT / "launch/recipes/demo.yaml", tiny_overrides(out / "run") + [SCHEDULE, f"data.dir={out / 'data'}"])
    prepare(cfg)
    manifest = read_manifest(cfg.shards_dir)
    plan = plan_schedule(cfg.data.mix, manifest["splits"]["train"], PER_STEP, "manifest")
    return cfg, manifest, plan, split_shards(cfg.shards_dir, manifest, "train"), Vocab.from_manifest(manifest)


def _take(stream, n):
    return [next(stream) for _ in range(n)]


def token_shares(batches, vocab) -> dict[str, float]:
    counts = Counter()
    for b in batches:
        real = b.task_ids >= 0
        counts.update(f"{vocab.tasks[t]}/{vocab.langs[lang]}" for t, lang in zip(b.task_ids[real].tolist(),
                                                                                 b.lang_ids[real].tolist()))
    total = sum(counts.values())
    return {k: n / total for k, n in counts.items()}


def test_prepare_writes_one_run_of_shards_per_source_at_natural_size(scheduled):
    cfg, manifest, _, _, _ = scheduled
    train = manifest["splits"]["train"]
    sources = train["sources"]
    assert len(sources) == 15 and "mix" not in manifest  # 5 tasks x 3 languages, nothing resampled at prepare
    for key, entry in sources.items():
        task, lang = key.split("/")
        assert all(name.startswith(f"train-{task}-{lang}-") for name in entry["shards"])
        assert entry["tokens"] == train["counts"]["by_task_lang"][key]["tokens"]
        assert entry["bytes"] > 0 and entry["words"] > 0
    assert sum(e["sequences"] for e in sources.values()) == train["counts"]["sequences"]
    assert sorted(n for e in sources.values() for n in e["shards"]) == sorted(s["name"] for s in train["shards"])


def test_each_phase_realises_its_weights(scheduled):
    """Tokens per source read from two phases' micro-batches against each phase's target share."""
    _, _, plan, shards, vocab = scheduled
    stream = make_loader(shards, vocab, MICRO, 0, 1, seed=3, plan=plan)
    per_phase = SWITCH * PER_STEP // MICRO
    for phase in plan.phases:
        realised = token_shares(_take(stream, per_phase), vocab)
        target = dict(zip(plan.sources, phase.target))
        assert max(abs(realised.get(k, 0) - share) for k, share in target.items()) < 0.005
        for task in ("text", "translation"):  # the weighted tasks: within 2% of their target
            want = sum(share for k, share in target.items() if k.startswith(task + "/"))
            got = sum(share for k, share in realised.items() if k.startswith(task + "/"))
            assert abs(got - want) <= 0.02 * want, (task, got, want)
    first, second = (dict(zip(plan.sources, p.target)) for p in plan.phases)
    assert sum(v for k, v in first.items() if k.startswith("text/")) > 0.35  # the schedule moved the mix
    assert sum(v for k, v in second.items() if k.startswith("text/")) < 0.1


def test_two_ranks_read_what_one_rank_reads_in_two_accumulation_steps_across_the_switch(scheduled):
    _, _, plan, shards, vocab = scheduled
    start = SWITCH * PER_STEP // MICRO - 6  # three steps before the switch, three after
    single = _take(make_loader(shards, vocab, MICRO, 0, 1, seed=3, plan=plan, start=start), 12)
    ranks = [make_loader(shards, vocab, MICRO, r, 2, seed=3, plan=plan, start=start, num_workers=r) for r in (0, 1)]
    both = [b for _ in range(6) for stream in ranks for b in [next(stream)]]
    assert [b.index for b in both] == [b.index for b in single]
    assert all(torch.equal(a.input_ids, b.input_ids) and a.keys == b.keys for a, b in zip(both, single))
    mine = [{k for b in both[r::2] for k in b.keys} for r in (0, 1)]
    assert not mine[0] & mine[1]


def test_resume_at_the_phase_boundary_is_exact_and_a_changed_schedule_is_refused(scheduled):
    cfg, manifest, plan, shards, vocab = scheduled
    boundary = SWITCH * PER_STEP // MICRO
    uninterrupted = _take(make_loader(shards, vocab, MICRO, 0, 1, seed=3, plan=plan, start=boundary - 4), 8)
    before = [make_loader(shards, vocab, MICRO, r, 2, seed=3, plan=plan, start=boundary - 4) for r in (0, 1)]
    seen = [b for _ in range(2) for stream in before for b in [next(stream)]]
    state = before[0].state_dict()
    assert state["position"] == boundary and state["mix_schedule"]["phases"][1][0] == SWITCH * PER_STEP
    check_resumable(state, MICRO, 3, True, shards, plan)
    after = make_loader(shards, vocab, MICRO, 0, 1, seed=3, plan=plan, start=state["position"])
    seen += _take(after, 4)
    assert [b.index for b in seen] == [b.index for b in uninterrupted]
    assert all(a.keys == b.keys and torch.equal(a.input_ids, b.input_ids) for a, b in zip(seen, uninterrupted))
    later = cfg.data.mix.model_copy(update={"schedule": [cfg.data.mix.schedule[0],
                                                         cfg.data.mix.schedule[1].model_copy(update={"start_step": SWITCH + 1})]})
    moved = plan_schedule(later, manifest["splits"]["train"], PER_STEP, "manifest")
    with pytest.raises(UserError, match="data.mix.schedule .* changed since the checkpoint"):
        check_resumable(state, MICRO, 3, True, shards, moved)
    with pytest.raises(UserError, match="mix_schedule changed|data.mix.schedule"):
        check_resumable(state, MICRO, 3, True, shards, None)


def test_schedules_change_without_preparing_again_but_need_shards_per_source(scheduled, demo_cfg):
    cfg, manifest, _, _, _ = scheduled
    other = load_config(ROOT / "launch/recipes/demo.yaml", tiny_overrides(cfg.output_dir.parent / "other") + [
        "data.mix.schedule=[{start_step: 0, language_weights: {yor: 3}}]", f"data.dir={cfg.data.dir}"])
    assert prepare(other).reused  # the same shards serve another schedule
    mixed_once = read_manifest(demo_cfg.shards_dir)["splits"]["train"]
    with pytest.raises(UserError, match="prepared without it .* data.mix.schedule set"):
        plan_schedule(other.data.mix, mixed_once, PER_STEP, "manifest")
    with pytest.raises(UserError, match="weight 0"):
        plan_schedule(load_config(ROOT / "launch/recipes/demo.yaml", [
            "data.mix.schedule=[{start_step: 0, language_weights: {yor: 0, hau: 0, ibo: 0}}]"]).data.mix,
            manifest["splits"]["train"], PER_STEP, "manifest")


@pytest.mark.parametrize("schedule, message", [
    ("[{start_step: 5}]", "must start at step 0"),
    ("[{start_step: 0}, {start_step: 0}]", "increasing steps"),
    ("[{start_step: 0, task_weights: {txt: 2}}]", "tasks not in data.tasks"),
])
def test_a_schedule_that_cannot_be_followed_is_refused_with_its_field(schedule, message):
    with pytest.raises(ValueError, match=message):
        load_config(ROOT / "launch/recipes/demo.yaml", [f"data.mix.schedule={schedule}"])
    with pytest.raises(ValueError, match="move them into the first phase"):
        load_config(ROOT / "launch/recipes/demo.yaml", ["data.mix.temperature=2", "data.mix.schedule=[{start_step: 0}]"])


def test_training_logs_the_realised_mix_of_each_phase(scheduled, world, tmp_path):
    """A real run on the per-source shards: the realised mix per phase in the run directory and in
    MLflow (an artifact, and a metric per source at each phase's first step)."""
    from mlflow.tracking import MlflowClient

    from sabiscale.train.loop import train

    cfg = scheduled[0].model_copy(deep=True)
    cfg.output_dir = tmp_path / "run"
    cfg.train.max_steps, cfg.optim.warmup_steps, cfg.train.eval_batches = 4, 1, 1
    cfg.tracking.system_metrics = False
    cfg.data.mix = cfg.data.mix.model_copy(update={"schedule": [
        cfg.data.mix.schedule[0], cfg.data.mix.schedule[1].model_copy(update={"start_step": 2})]})
    result = train(cfg, world)
    phases = json.loads((cfg.output_dir / "mix_schedule.json").read_text())
    assert [p["start_step"] for p in phases] == [0, 2] and all(p["samples"] == 2 * MICRO for p in phases)
    for phase in phases:
        assert sum(e["sequences"] for e in phase["sources"].values()) == 2 * MICRO
        assert abs(sum(e["realised_share"] for e in phase["sources"].values()) - 1) < 1e-4
    client = MlflowClient(tracking_uri=f"sqlite:///{cfg.output_dir / 'mlflow.db'}")
    history = client.get_metric_history(result.run_id, "mix/text/yor")
    assert sorted(m.step for m in history) == [0, 2]
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == [p["sources"]["text/yor"]["realised_share"]
                                                                        for p in phases]
    assert "data/mix_schedule.json" in {a.path for a in client.list_artifacts(result.run_id, "data")}
