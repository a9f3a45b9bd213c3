"""Selective language modeling (Rho-1): selection rules, exactness against the masked loss,
scoring shards with a real reference checkpoint, and selective training on 1 and 2 real ranks."""
import dataclasses
import io
import json
import tarfile

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import BIN, ROOT, fresh_run_dir, run_cli, tiny_overrides
from sabiscale.data.batch import Vocab
from sabiscale.data.loader import make_loader
from sabiscale.shards.format import split_shards
from sabiscale.loss.head import selected_count, top_excess
from sabiscale.loss.objective import TokenLossObjective
from sabiscale.model.build import build_model
from sabiscale.shards.verify import verify_shards
from sabiscale.shards.format import read_manifest

# CLI subprocesses, 2-rank launches, MLflow servers: `make test`, not `make check`
pytestmark = pytest.mark.integration

RATIO = 0.6


def test_top_excess_on_hand_computed_cases_and_ties():
    excess = torch.tensor([0.5, -1.0, 2.0, 0.5, 0.1])
    assert selected_count(5, 0.6) == 3 and selected_count(5, 0.5) == 3 and selected_count(5, 0.4) == 2
    assert top_excess(excess, 0.6).tolist() == [True, False, True, True, False]
    assert top_excess(excess, 0.2).tolist() == [False, False, True, False, False]
    # ties: the earlier token wins, whatever the sort kernel does
    assert top_excess(torch.ones(4), 0.5).tolist() == [True, True, False, False]
    assert top_excess(torch.tensor([0.0, 3.0, 3.0, 3.0]), 0.5).tolist() == [False, True, True, False]
    assert top_excess(excess, 1.0).all() and not top_excess(torch.zeros(0), 0.6).any()


def _grads(objective, batch, **kw):
    objective.zero_grad()
    out = objective(batch.input_ids, batch.position_ids, batch.loss_mask, batch.task_ids, **kw)
    out.loss_sum.backward()
    return out, {n: p.grad.clone() for n, p in objective.named_parameters()}


def _objective(demo_cfg, tok, kind, ratio=1.0, chunk=64):
    lm = build_model(demo_cfg.model, len(tok), demo_cfg.data.seq_len, tok.pad_token_id, tok.eos_token_id, 0)
    return TokenLossObjective(lm, kind, chunk, tok.pad_token_id, ratio=ratio)


@pytest.mark.parametrize("chunk", [64, 4096], ids=["chunked", "one_block"])
def test_ratio_one_is_exactly_the_masked_loss(demo_cfg, parts, chunk):
    tok, batch, _ = parts
    ref_loss = torch.rand(batch.input_ids.shape) * 5
    masked, g_masked = _grads(_objective(demo_cfg, tok, "masked", chunk=chunk), batch)
    selective, g_sel = _grads(_objective(demo_cfg, tok, "selective", 1.0, chunk=chunk), batch, ref_loss=ref_loss)
    assert torch.equal(masked.loss_sum, selective.loss_sum) and torch.equal(masked.selected, selective.selected)
    assert all(torch.equal(g_masked[n], g_sel[n]) for n in g_masked)


@pytest.mark.parametrize("chunk", [64, 4096], ids=["chunked", "one_block"])
def test_selective_trains_exactly_the_top_excess_tokens(demo_cfg, parts, chunk):
    """Reference losses are built so that every token's excess is known; the selective loss and its
    gradients must equal the masked loss over exactly those tokens."""
    tok, batch, _ = parts
    objective = _objective(demo_cfg, tok, "selective", RATIO, chunk=chunk)
    with torch.no_grad():
        current = objective(batch.input_ids, batch.position_ids, batch.loss_mask, kind="masked")
    candidates = batch.loss_mask[:, 1:]
    n = int(candidates.sum())
    wanted_excess = torch.randperm(n, generator=torch.Generator().manual_seed(0)).float() / n  # distinct
    ref_loss = torch.full(batch.input_ids.shape, float("nan"))
    ref_loss[:, 1:][candidates] = current.per_token - wanted_excess
    out, g_sel = _grads(objective, batch, ref_loss=ref_loss)
    k = selected_count(n, RATIO)
    winners = torch.zeros(n, dtype=torch.bool)
    winners[torch.argsort(wanted_excess, descending=True)[:k]] = True
    assert int(out.count) == k == int(objective.count_targets(batch.input_ids, batch.position_ids, batch.loss_mask))
    assert torch.equal(out.selected[candidates], winners)
    assert torch.allclose(out.excess, wanted_excess, atol=1e-5)

    only_winners = dataclasses.replace(batch, loss_mask=batch.loss_mask.clone())
    only_winners.loss_mask[:, 1:] = out.selected
    masked = _objective(demo_cfg, tok, "masked", chunk=chunk)
    expected, g_masked = _grads(masked, only_winners)
    assert torch.allclose(out.loss_sum, expected.loss_sum, rtol=1e-6)
    for name in g_masked:  # the ranking's log-sum-exp is reused: equal up to fp32 rounding
        assert (g_sel[name] - g_masked[name]).norm() <= 1e-5 * g_masked[name].norm(), name


def test_sampled_selection_draws_with_odds_exp_excess_over_temperature():
    """Gumbel top-k: with k = 1 the chosen token is a draw from softmax(excess / T); the draw is a
    function of the seed alone, and a cold temperature is the top selection."""
    from sabiscale.loss.kinds import draw_seed, gumbel_noise

    excess, temperature = torch.tensor([0.0, 0.5, 1.0, 2.0]), 0.7
    draws = 4000
    chosen = torch.stack([top_excess(excess + temperature * gumbel_noise(4, draw_seed(3, i), torch.device("cpu")),
                                     0.25) for i in range(draws)])
    assert (chosen.sum(1) == 1).all()
    expected = torch.softmax(excess / temperature, 0)
    observed = chosen.float().mean(0)
    sigma = (expected * (1 - expected) / draws).sqrt()
    assert ((observed - expected).abs() < 4 * sigma).all(), (observed, expected)
    assert torch.equal(gumbel_noise(9, draw_seed(3, 5), torch.device("cpu")),
                       gumbel_noise(9, draw_seed(3, 5), torch.device("cpu")))
    assert draw_seed(3, 5) != draw_seed(3, 6) and draw_seed(3, 5) != draw_seed(4, 5)


def test_sampled_selection_in_the_objective(demo_cfg, parts):
    """The same micro-batch seed draws the same tokens, another seed others, always the ratio's
    count; at a near-zero temperature the draw is the top selection."""
    from sabiscale.config import LossConfig
    from sabiscale.loss.kinds import make_loss_kind

    tok, batch, _ = parts
    lm = build_model(demo_cfg.model, len(tok), demo_cfg.data.seq_len, tok.pad_token_id, tok.eos_token_id, 0)

    def selection(temperature, seed):
        kind = make_loss_kind(LossConfig(kind="selective", ratio=RATIO, selection="sample", temperature=temperature))
        with torch.no_grad():
            return TokenLossObjective(lm, kind, 64, tok.pad_token_id)(
                batch.input_ids, batch.position_ids, batch.loss_mask, ref_loss=ref_loss, draw_seed=seed).selected

    ref_loss = torch.rand(batch.input_ids.shape, generator=torch.Generator().manual_seed(1)) * 5
    with torch.no_grad():
        top = TokenLossObjective(lm, "selective", 64, tok.pad_token_id, ratio=RATIO)(
            batch.input_ids, batch.position_ids, batch.loss_mask, ref_loss=ref_loss).selected
    first, again, other = selection(1.0, 11), selection(1.0, 11), selection(1.0, 12)
    k = selected_count(int(batch.loss_mask[:, 1:].sum()), RATIO)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert int(first.sum()) == int(other.sum()) == k and not torch.equal(first, top)
    assert torch.equal(selection(1e-6, 11), top)
    with pytest.raises(ValueError, match="draw_seed"):
        TokenLossObjective(lm, make_loss_kind(LossConfig(kind="selective", selection="sample")), 64,
                           tok.pad_token_id)(batch.input_ids, batch.position_ids, batch.loss_mask, ref_loss=ref_loss)


def test_selection_sample_is_refused_for_kinds_that_do_not_select():
    from pydantic import ValidationError
    from sabiscale.config import LossConfig

    with pytest.raises(ValidationError, match="loss.selection=sample applies to a kind that selects"):
        LossConfig(kind="masked", selection="sample")


@pytest.fixture(scope="module")
def reference_run(demo_cfg, world, tmp_path_factory):
    """A short real masked run: its checkpoint is the reference model ("self-reference")."""
    from sabiscale.train.loop import train

    cfg = demo_cfg.model_copy(deep=True)
    cfg.output_dir = fresh_run_dir(demo_cfg, tmp_path_factory.mktemp("reference"))
    cfg.tracking.enabled = False
    cfg.train.max_steps, cfg.optim.warmup_steps, cfg.train.eval_batches = 8, 1, 1
    return train(cfg, world).checkpoint


@pytest.fixture(scope="module")
def scored(demo_cfg, world, reference_run, tmp_path_factory):
    from sabiscale.evaluate.score import score_shards

    out = tmp_path_factory.mktemp("scored") / "shards"
    score_shards(reference_run, demo_cfg.shards_dir, out, world.rank, world.world_size, world.device, batch_size=8)
    return out


def test_scored_shards_carry_the_reference_losses_aligned(demo_cfg, reference_run, scored, world, tmp_path):
    from sabiscale.evaluate.score import score_shards
    from sabiscale.train.reference import Reference

    manifest = read_manifest(scored)
    assert manifest["reference"]["checkpoint"] == str(reference_run)
    assert manifest["reference"]["tokenizer_sha256"] == manifest["tokenizer_sha256"]
    assert verify_shards(scored)[0] == []
    # the same records, so the same contamination fingerprints: a run trained on them can be evaluated
    fingerprints = manifest["fingerprints"]["file"]
    assert (scored / fingerprints).read_bytes() == (demo_cfg.shards_dir / fingerprints).read_bytes()
    vocab = Vocab.from_manifest(manifest)
    batch = next(make_loader(split_shards(scored, manifest, "train"), vocab, 4, 0, 1, 0, 0, 0))
    expected = Reference(reference_run, world.device).score(batch)
    finite = torch.isfinite(batch.ref_loss)
    assert torch.equal(finite[:, 1:], batch.loss_mask[:, 1:]) and not finite[:, 0].any()
    assert torch.allclose(batch.ref_loss[finite], expected[finite], rtol=2e-3, atol=2e-3)  # float16 storage

    # resuming: a shard already scored is kept as it is, the rest is written; the result is byte-identical
    again = tmp_path / "again"
    again.mkdir()
    first = manifest["splits"]["train"]["shards"][0]["name"]
    (again / first).write_bytes((scored / first).read_bytes())
    (again / "scoring.json").write_text((scored / "scoring.json").read_text())
    score_shards(reference_run, demo_cfg.shards_dir, again, 0, 1, world.device, batch_size=3)
    assert (again / "manifest.json").read_text() == (scored / "manifest.json").read_text()
    with pytest.raises(FileExistsError, match="already holds scored shards"):
        score_shards(reference_run, demo_cfg.shards_dir, again, 0, 1, world.device)


def test_misaligned_reference_losses_are_refused_by_member(scored, tmp_path):
    """A ref_loss array shifted by one token, as a scoring bug or a foreign tool would write it."""
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(scored, bad)
    shard = bad / read_manifest(bad)["splits"]["train"]["shards"][0]["name"]
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    victim = next(m.name for m, _ in members if m.name.endswith(".ref_loss.npy"))
    with tarfile.open(shard, "w") as tar:
        for member, data in members:
            if member.name == victim:
                data_io = io.BytesIO()
                np.save(data_io, np.roll(np.load(io.BytesIO(data)), 1), allow_pickle=False)
                data = data_io.getvalue()
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    problems = verify_shards(bad)[0]
    key = victim.removesuffix(".ref_loss.npy")
    assert any(f"member {key}" in p and "not aligned" in p for p in problems), problems
    manifest = read_manifest(bad)
    loader = make_loader(split_shards(bad, manifest, "train"), Vocab.from_manifest(manifest), 4, 0, 1, 0, 0, 0)
    with pytest.raises(ValueError, match=f"{key}: ref_loss is not aligned"):
        for _ in range(100):
            next(loader)


def test_a_reference_of_another_tokenizer_is_refused(demo_cfg, reference_run, world, tmp_path):
    import shutil

    from sabiscale.evaluate.score import score_shards

    other = tmp_path / "shards"
    shutil.copytree(demo_cfg.shards_dir, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["tokenizer_sha256"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="trained with tokenizer .* but .* uses 000000000000"):
        score_shards(reference_run, other, tmp_path / "out", 0, 1, world.device)
    assert not (tmp_path / "out").exists()


def _selection_history(store: str) -> tuple[dict, dict]:
    client = MlflowClient(tracking_uri=store)
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert len(runs) == 1
    run = runs[0]
    fraction = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "select/selected_fraction")}
    return fraction, run.data.metrics


def _selective_overrides(demo_cfg, scored, out, store):
    return tiny_overrides(out) + [
        f"data.shards_dir={scored}", f"tokenizer.path={demo_cfg.tokenizer_path}", "loss.kind=selective",
        f"loss.ratio={RATIO}", "loss.selection=sample", "loss.temperature=0.2", "train.max_steps=6", "optim.warmup_steps=1", "train.eval_batches=1",
        "train.log_every=3", f"tracking.uri={store}", "tracking.system_metrics=false"]


def test_selective_training_two_ranks_equal_one_rank_with_accumulation(demo_cfg, scored, world, tmp_path):
    """Selection is per micro-batch, the unit of the world-size-invariant stream: 2 gloo ranks x 1
    micro-batch select the same tokens and make the same updates as 1 rank x 2 accumulation steps,
    also when the selection is a draw (loss.selection=sample: seeded by the micro-batch's place in
    the stream, not by the rank; top selection is the same code without the noise)."""
    from sabiscale.config import load_config
    from sabiscale.train.loop import train

    store2 = f"sqlite:///{tmp_path / 'two.db'}"
    run_cli([BIN / "deepspeed", "--num_gpus", "2", "--master_port", "29737", "--module", "sabiscale", "train",
             str(ROOT / "launch/recipes/demo.yaml"), *_selective_overrides(demo_cfg, scored, tmp_path / "two", store2)])
    fraction2, metrics2 = _selection_history(store2)

    store1 = f"sqlite:///{tmp_path / 'one.db'}"
    cfg = load_config(ROOT / "launch/recipes/demo.yaml",
                      _selective_overrides(demo_cfg, scored, tmp_path / "one", store1) + ["train.grad_accum_steps=2"])
    one = train(cfg, world)
    fraction1, metrics1 = _selection_history(store1)

    client = MlflowClient(tracking_uri=store2)
    run2 = client.search_runs([e.experiment_id for e in client.search_experiments()])[0]
    two_losses = [m.value for m in sorted(client.get_metric_history(run2.info.run_id, "train/loss"), key=lambda m: m.step)]
    assert one.train_losses == pytest.approx(two_losses, rel=1e-5, abs=1e-6)
    assert fraction1 == fraction2 and sorted(fraction1) == list(range(1, 7))
    for value in fraction1.values():  # a fixed share of each micro-batch's answer tokens
        assert value == pytest.approx(RATIO, abs=0.01)
    assert metrics1["select/excess_selected"] > metrics1["select/excess_rejected"]
    rates = {k: v for k, v in metrics1.items() if k.startswith("train/selection_rate/task/")}
    assert set(rates) == {f"train/selection_rate/task/{t}" for t in Vocab.from_manifest(read_manifest(scored)).tasks}
    assert all(0 < v <= 1 for v in rates.values())


def test_selective_needs_scored_shards_or_an_online_reference(demo_cfg, reference_run, world, tmp_path):
    from sabiscale.config import load_config
    from sabiscale.train.loop import train

    plain = load_config(ROOT / "launch/recipes/demo.yaml", tiny_overrides(fresh_run_dir(demo_cfg, tmp_path / "a"))
                        + ["loss.kind=selective", "tracking.enabled=false"])
    with pytest.raises(ValueError, match="sabiscale score --reference"):
        train(plain, world)

    store = f"sqlite:///{tmp_path / 'online.db'}"
    online = load_config(ROOT / "launch/recipes/demo.yaml", tiny_overrides(fresh_run_dir(demo_cfg, tmp_path / "b")) + [
        "loss.kind=selective", f"loss.ratio={RATIO}", "loss.reference=online",
        f"loss.reference_checkpoint={reference_run}", "train.max_steps=3", "optim.warmup_steps=1",
        "train.eval_batches=1", "train.log_every=3", f"tracking.uri={store}", "tracking.system_metrics=false"])
    train(online, world)
    fraction, metrics = _selection_history(store)
    assert sorted(fraction) == [1, 2, 3] and all(v == pytest.approx(RATIO, abs=0.01) for v in fraction.values())


def test_rho1_on_real_data_reference_on_the_high_quality_subset_score_and_train(shared_data, tmp_path):
    """The workflow as users run it, through the console script on ../shared/data: prepare the
    mix; train a reference on the translation + NER subset with the same tokenizer; score the
    mix's shards with it; train selective; the logged selection fraction is the ratio."""
    recipe = str(ROOT / "launch/recipes/shared_data.yaml")
    common = [f"data.jsonl_root={shared_data}", "data.max_records_per_file=40", "data.seq_len=256",
              "data.sequences_per_shard=32", "data.val_fraction=0.1", "tokenizer.vocab_size=1000",
              "model.hidden_size=64", "model.num_layers=1", "model.num_heads=2", "model.intermediate_size=128",
              "train.eval_batches=1", "optim.warmup_steps=1", "train.eval_every=0", "tracking.system_metrics=false"]
    mix, ref, sel = tmp_path / "mix", tmp_path / "reference", tmp_path / "selective"
    run_cli([BIN / "sabiscale", "prepare", recipe, f"output_dir={mix}", f"data.dir={mix}", *common])
    tokenizer = mix / "tokenizer" / "tokenizer.json"
    subset = [f"output_dir={ref}", f"data.dir={ref}", f"tokenizer.path={tokenizer}", "data.tasks=[translation, ner]", "train.max_steps=8"]
    run_cli([BIN / "sabiscale", "prepare", recipe, *common, *subset])
    run_cli([BIN / "sabiscale", "train", recipe, *common, *subset])
    proc = run_cli([BIN / "sabiscale", "score", "--reference", str(ref / "checkpoints"), "--shards", str(mix / "shards"),
                    "--out", str(tmp_path / "scored")])
    assert "scored shards" in proc.stdout
    manifest = read_manifest(tmp_path / "scored")
    assert manifest["reference"]["checkpoint"] == str(ref / "checkpoints" / "step_00000008")
    run_cli([BIN / "sabiscale", "train", recipe, *common, f"output_dir={sel}", f"data.dir={sel}", f"tokenizer.path={tokenizer}",
             f"data.shards_dir={tmp_path / 'scored'}", "loss.kind=selective", "loss.ratio=0.7", "train.max_steps=4",
             "train.log_every=2"])
    fraction, metrics = _selection_history(f"sqlite:///{sel / 'mlflow.db'}")
    assert sorted(fraction) == [1, 2, 3, 4]
    assert all(v == pytest.approx(0.7, abs=0.01) for v in fraction.values()), fraction
    # every task of the mix is ranked, also those the reference never saw
    rates = {k.rsplit("/", 1)[1]: v for k, v in metrics.items() if k.startswith("train/selection_rate/task/")}
    assert {"translation", "ner", "sentiment", "text"} <= set(rates), rates


def test_scoring_on_two_ranks_writes_the_same_shards_as_one(demo_cfg, reference_run, scored, tmp_path):
    """`deepspeed --num_gpus 2 --module sabiscale score`: shards split over the ranks (shard i on
    rank i mod 2), rank 0 writes the manifest; every sample carries the same reference losses as
    when one process scores (up to float16 rounding of a differently threaded matmul)."""
    out = tmp_path / "two_ranks"
    run_cli([BIN / "deepspeed", "--num_gpus", "2", "--master_port", "29743", "--module", "sabiscale", "score",
             "--reference", str(reference_run), "--shards", str(demo_cfg.shards_dir), "--out", str(out)])
    one, two = read_manifest(scored), read_manifest(out)
    assert two["reference"] == one["reference"] and verify_shards(out)[0] == []
    assert [s["name"] for sp in two["splits"].values() for s in sp["shards"]] == \
        [s["name"] for sp in one["splits"].values() for s in sp["shards"]]
    for shard in sorted(scored.glob("*.tar")):
        a, b = _ref_losses(shard), _ref_losses(out / shard.name)
        assert a.keys() == b.keys() and a
        for key in a:
            assert np.array_equal(np.isnan(a[key]), np.isnan(b[key]))
            assert np.allclose(a[key], b[key], rtol=2e-3, atol=2e-3, equal_nan=True), (shard.name, key)


def _ref_losses(shard) -> dict:
    with tarfile.open(shard) as tar:
        return {m.name: np.load(io.BytesIO(tar.extractfile(m).read()), allow_pickle=False).astype(np.float32)
                for m in tar if m.name.endswith(".ref_loss.npy")}
