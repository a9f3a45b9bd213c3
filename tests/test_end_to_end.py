"""Whole runs through the real console script, the real DeepSpeed engine and a real MLflow store."""
import json

import pytest
from mlflow.tracking import MlflowClient

from conftest import BIN, ROOT, fresh_run_dir, run_cli, tiny_overrides

# CLI subprocesses, 2-rank launches, MLflow servers: `make test`, not `make check`
pytestmark = pytest.mark.integration


def _single_run(store_uri: str):
    client = MlflowClient(tracking_uri=store_uri)
    experiments = [e for e in client.search_experiments() if e.name != "Default"]
    runs = [r for e in experiments for r in client.search_runs([e.experiment_id])]
    assert len(runs) == 1, f"expected exactly one MLflow run, found {len(runs)}"
    return client, runs[0]


def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    overrides = [o for o in tiny_overrides(out) if not o.startswith("output_dir=")]
    proc = run_cli([BIN / "sabiscale", "demo", "--out", str(out), *overrides])
    assert "sabiscale demo finished." in proc.stdout and "mlflow ui --backend-store-uri" in proc.stdout

    ckpt = out / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step_00000020"
    assert (ckpt / "step_00000020" / "mp_rank_00_model_states.pt").is_file()
    assert list((ckpt / "step_00000020").glob("*optim_states.pt"))

    client, run = _single_run(f"sqlite:///{out / 'mlflow.db'}")
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert len(losses) == 20
    answer = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "eval/answer_loss")}
    assert answer[20] < 0.75 * answer[0], answer  # learning, measured on held-out data
    assert sum(losses[-5:]) / 5 < 0.75 * losses[0]
    assert run.data.params["train.max_steps"] == "20" and run.data.params["loss.kind"] == "masked"
    assert {m.key for m in client.get_metric_history(run.info.run_id, "train/tokens_per_s")} == {"train/tokens_per_s"}
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "config")}
    assert "config/deepspeed.json" in artifacts
    assert run.data.tags["checkpoint"].endswith("step_00000020")


@pytest.mark.parametrize("precision,rel", [("fp32", 1e-5), ("bf16", 2e-2)])
def test_two_ranks_equal_one_rank_with_accumulation(demo_cfg, world, tmp_path, precision, rel):
    """`deepspeed --num_gpus 2` starts 2 CPU ranks (gloo), each reading its own micro-batches. With
    the loss normalized once by the global supervised-token count, 2 ranks x 1 micro-batch make
    the same updates as 1 rank x 2 accumulation steps: the loss curves agree to fp32 tolerance,
    and in bf16 (what a wide model gets on a CPU with native bf16) to bf16's rounding."""
    from sabiscale.train.loop import train

    out = fresh_run_dir(demo_cfg, tmp_path / "two_ranks")
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    steps = ["train.max_steps=6", "optim.warmup_steps=1", "train.eval_batches=1"]
    overrides = tiny_overrides(out) + steps + [f"tracking.uri={store}", "train.grad_accum_steps=1",
                                               f"engine.precision={precision}"]
    proc = run_cli([BIN / "deepspeed", "--num_gpus", "2", "--master_port", "29731", "--module", "sabiscale",
                    "train", str(ROOT / "launch/recipes/demo.yaml"), *overrides])
    # not a terminal: plain progress lines, from rank 0 only
    assert proc.stdout.count("step 6/6 loss") == 1, proc.stdout[-2000:]
    step_dir = out / "checkpoints" / "step_00000006"
    partitions = sorted(p.name for p in step_dir.glob("*optim_states.pt"))
    prefix = "bf16_" if precision == "bf16" else ""
    assert partitions == [f"{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)]
    client, run = _single_run(store)  # rank 0 tracks; rank 1 must not open a second run
    two_ranks = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)]
    assert len(two_ranks) == 6

    single = demo_cfg.model_copy(deep=True)
    single.output_dir = fresh_run_dir(demo_cfg, tmp_path / "one_rank")
    single.tracking.enabled = False
    single.train.max_steps, single.optim.warmup_steps, single.train.eval_batches = 6, 1, 1
    single.train.grad_accum_steps, single.engine.precision = 2, precision
    one_rank = train(single, world).train_losses
    assert one_rank == pytest.approx(two_ranks, rel=rel, abs=1e-6)
    assert one_rank[-1] < one_rank[0]


def test_real_data_prepare_and_train(shared_data, tmp_path):
    out = tmp_path / "real"
    recipe = ROOT / "launch/recipes/shared_data.yaml"
    overrides = [f"output_dir={out}", f"data.dir={out}", f"data.jsonl_root={shared_data}", "data.max_records_per_file=40",
                 "data.seq_len=256", "data.sequences_per_shard=64", "data.val_fraction=0.1",
                 "tokenizer.vocab_size=1000", "model.hidden_size=64", "model.num_layers=1", "model.num_heads=2",
                 "model.intermediate_size=128", "train.max_steps=6", "train.eval_batches=1",
                 "optim.warmup_steps=1", "train.eval_every=0"]
    proc = run_cli([BIN / "sabiscale", "prepare", str(recipe), *overrides])
    assert "manifest" in proc.stdout
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    by = manifest["splits"]["train"]["counts"]["by_task_lang"]
    for key in ("translation/yor", "ner/hau", "sentiment/pcm", "descramble/ibo", "text/eng"):
        assert by[key]["supervised_tokens"] > 0, key
    proc = run_cli([BIN / "sabiscale", "train", str(recipe), *overrides])
    assert "trained 6 steps" in proc.stdout
    assert (out / "checkpoints" / "step_00000006").is_dir()
