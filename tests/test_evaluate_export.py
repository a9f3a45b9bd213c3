"""Evaluation metrics and the Hugging Face export, on checkpoints written by the real engine."""
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import BIN, ROOT, fresh_run_dir, run_cli
from sabiscale.publish.export import export_hf
from sabiscale.train.checkpoint import load_trained_lm
from sabiscale.data.batch import Vocab
from sabiscale.data.loader import make_loader
from sabiscale.shards.format import split_shards
from sabiscale.evaluate.heldout import ner_scores, parse_ner, parse_sentiment, sentiment_scores
from sabiscale.loss.objective import TokenLossObjective
from sabiscale.shards.format import read_manifest
from sabiscale.tasks import BUILTIN_TASKS, special_tokens

# CLI subprocesses, 2-rank launches, MLflow servers: `make test`, not `make check`
pytestmark = pytest.mark.integration


def test_unparsable_outputs_count_as_wrong():
    assert parse_ner("B-PER O", 2) == ["B-PER", "O"]
    assert parse_ner("B-PER", 2) is None and parse_ner("B-PER banana", 2) is None
    assert parse_sentiment(" Positive ") == "positive" and parse_sentiment("great") is None
    gold = [["B-PER", "O"], ["B-LOC", "I-LOC"]]
    assert ner_scores([["B-PER", "O"], ["B-LOC", "I-LOC"]], gold)["entity_f1"] == 1.0
    half = ner_scores([["B-PER", "O"], None], gold)
    assert half["unparsed"] == 1 and half["entity_f1"] == pytest.approx(2 / 3)  # P=1, R=1/2
    s = sentiment_scores(["positive", None, "negative"], ["positive", "negative", "negative"])
    assert s["accuracy"] == pytest.approx(2 / 3) and s["unparsed"] == 1
    # positive: P=1 R=1 -> 1; negative: P=1 R=1/2 -> 2/3
    assert s["macro_f1"] == pytest.approx((1 + 2 / 3) / 2)
    wrong_label = sentiment_scores(["neutral", "positive"], ["positive", "positive"])
    assert wrong_label["macro_f1"] == pytest.approx((2 / 3 + 0) / 2)  # a predicted label absent from gold counts


@pytest.fixture(scope="module")
def zero3_checkpoint(demo_cfg, world, tmp_path_factory):
    """A checkpoint whose parameters are partitioned by ZeRO-3, from a short real run that exports
    as it goes (train.export_every=2 of 3 steps: at step 2, and at the end)."""
    from sabiscale.train.loop import train

    cfg = demo_cfg.model_copy(deep=True)
    cfg.output_dir = fresh_run_dir(demo_cfg, tmp_path_factory.mktemp("zero3"))
    cfg.tracking.enabled = False
    cfg.engine.ds_config = ROOT / "ds_configs/zero3_offload.json"
    cfg.train.max_steps, cfg.optim.warmup_steps, cfg.train.eval_batches = 3, 1, 1
    cfg.train.export_every = 2
    return train(cfg, world).checkpoint


def test_export_every_writes_loadable_exports_beside_the_checkpoints(zero3_checkpoint, monkeypatch):
    """Step 2 (no checkpoint_every there: one is saved for it) and the last step are exported in
    the background, whole and renamed; each loads in plain transformers with the checkpoint's
    weights and logits; an export is not mistaken for a checkpoint."""
    from sabiscale.errors import MissingInput
    from sabiscale.train.checkpoint import resolve_checkpoint

    checkpoints = zero3_checkpoint.parent
    assert sorted(p.name for p in checkpoints.glob("step_*/hf")) == ["hf", "hf"]
    assert not list(checkpoints.rglob("*.partial")), "an unfinished export was left behind"
    assert "export of" in (checkpoints.parent / "exports.log").read_text()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = AutoModelForCausalLM.from_pretrained(str(zero3_checkpoint / "hf"), local_files_only=True).eval()
    lm, _, _ = load_trained_lm(zero3_checkpoint)
    for name, param in lm.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], param, msg=name)
    ids = torch.arange(5, 37).reshape(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, use_cache=False).logits, lm(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(MissingInput, match="is a Hugging Face export"):
        resolve_checkpoint(zero3_checkpoint / "hf")


def test_export_loads_offline_and_matches_sabiscale_forward(demo_cfg, zero3_checkpoint, tmp_path, monkeypatch):
    out = export_hf(zero3_checkpoint, tmp_path / "hf")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    for tag in special_tokens(["yor", "hau", "ibo"], [BUILTIN_TASKS[t] for t in demo_cfg.data.tasks]):
        assert len(tok.encode(tag, add_special_tokens=False)) == 1, tag

    lm, our_tok, meta = load_trained_lm(zero3_checkpoint)
    assert meta["step"] == 3
    for name, param in lm.state_dict().items():  # the consolidated ZeRO-3 weights, unchanged by export
        torch.testing.assert_close(model.state_dict()[name], param, msg=name)

    manifest = read_manifest(demo_cfg.shards_dir)
    batch = next(make_loader(split_shards(demo_cfg.shards_dir, manifest, "val"), Vocab.from_manifest(manifest),
                             2, 0, 1, 0, 0, 0))
    objective = TokenLossObjective(lm, "masked", 64, our_tok.pad_token_id)
    with torch.no_grad():
        ours = objective(batch.input_ids, batch.position_ids, batch.loss_mask)
        logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits
    theirs = torch.nn.functional.cross_entropy(logits[:, :-1][ours.selected], batch.input_ids[:, 1:][ours.selected],
                                               reduction="none")
    torch.testing.assert_close(ours.per_token, theirs, rtol=1e-5, atol=1e-5)

    with pytest.raises(FileExistsError, match="not empty"):
        export_hf(zero3_checkpoint, out)  # never overwrites


def test_eval_command_reports_every_task_and_language(demo_cfg, zero3_checkpoint, tmp_path):
    """...of a checkpoint, and the same numbers for its export (train.export_every)."""
    report_path = tmp_path / "report.json"
    proc = run_cli([BIN / "sabiscale", "eval", str(zero3_checkpoint), "--split", "val", "--generate", "3",
                    "--out", str(report_path)])
    exported = tmp_path / "exported.json"
    run_cli([BIN / "sabiscale", "eval", str(zero3_checkpoint / "hf"), "--split", "val", "--generate", "3",
             "--out", str(exported)])
    of_export = json.loads(exported.read_text())
    assert of_export["teacher_forced"] == json.loads(report_path.read_text())["teacher_forced"]
    assert of_export["generation"] == json.loads(report_path.read_text())["generation"]
    assert "bits/byte" in proc.stdout
    report = json.loads(report_path.read_text())
    tf = report["teacher_forced"]
    expected = {f"{t}/{lang}" for t in demo_cfg.data.tasks for lang in ("hau", "ibo", "yor")}
    assert set(tf) == expected
    assert all(math.isfinite(m["bits_per_byte"]) and m["bits_per_byte"] > 0 for m in tf.values())
    gen = report["generation"]
    assert {"translation/eng-yor", "ner/hau", "sentiment/ibo"} <= set(gen)
    assert 0 <= gen["translation/eng-yor"]["chrf"] <= 100
    assert "unparsed" in gen["ner/hau"] and "macro_f1" in gen["sentiment/ibo"]


def test_an_export_carries_a_model_card_and_generation_config(demo_cfg, zero3_checkpoint, tmp_path, monkeypatch):
    """The Hub parses the card (languages, pipeline, tags, datasets, an example prompt per task);
    that prompt generates through transformers' pipeline; an eval report of the checkpoint shows
    in the card of a later export."""
    import shutil

    from huggingface_hub import ModelCard
    from transformers import GenerationConfig, pipeline

    tag_dir = tmp_path / "checkpoints" / zero3_checkpoint.name
    shutil.copytree(zero3_checkpoint, tag_dir)
    out = export_hf(tag_dir, tmp_path / "hf")
    card = ModelCard.load(out / "README.md")
    assert card.data.language == ["ha", "ig", "yo"] and card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "text-generation" and "loss-masked" in card.data.tags
    assert "translation" in card.text and "Not evaluated yet" in card.text
    prompts = {w["example_title"]: w["text"] for w in card.data.widget}
    assert set(prompts) == set(demo_cfg.data.tasks) and prompts["translation"].startswith("<translate> ")
    generation = GenerationConfig.from_pretrained(str(out))
    tok = AutoTokenizer.from_pretrained(str(out))
    assert (generation.eos_token_id, generation.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)
    assert generation.max_length == demo_cfg.data.seq_len
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    generate = pipeline("text-generation", model=str(out), device="cpu")
    text = generate(prompts["translation"], max_new_tokens=8)[0]["generated_text"]
    assert text.startswith(prompts["translation"]) and len(text) > len(prompts["translation"])

    report = {"split": "val", "data": "demo", "step": 3, "examples_per_file": 5,
              "teacher_forced": {"ner/yor": {"n": 7, "answer_tokens": 10, "answer_bytes": 20, "perplexity": 2.5,
                                             "bits_per_byte": 0.9, "bits_per_byte_ci": [0.8, 1.0]}},
              "generation": {"ner/yor": {"examples": 4, "entity_f1": 0.25, "unparsed": 1}}}
    (tag_dir / "eval_val.json").write_text(json.dumps(report))
    again = ModelCard.load(export_hf(tag_dir, tmp_path / "hf2") / "README.md")
    assert "| ner/yor | 7 | 2.50 | 0.900 [0.800, 1.000] |" in again.text and "entity_f1 0.250" in again.text


def test_lm_eval_harness_on_an_export_agrees_with_sabiscale_eval(demo_cfg, zero3_checkpoint, shared_data, tmp_path):
    """`sabiscale eval EXPORT --harness` runs lm-evaluation-harness (its hf model, its task loader)
    with sabiscale's tag-format tasks on the dev records of a ../shared/data-style directory; on
    the same records its chrF, BLEU, entity F1, accuracy, macro-F1 and bits/byte are sabiscale
    eval's. 8 dev records per file and --max-per-file 4: both take the same 4, spread over the file."""
    root = tmp_path / "data"
    for rel in ("translation/eng-yor.jsonl", "ner/yor.jsonl", "sentiment/yor.jsonl", "text/yor.jsonl"):
        # short records: the demo model's context is 128 tokens, and lm-eval cuts longer prompts from the left
        dev = [json.loads(line) for line in (shared_data / rel).read_text(encoding="utf-8").splitlines()
               if ('"orig_split": "dev"' in line or "-dev-" in line) and len(line) < 200][:8]
        (root / rel).parent.mkdir(parents=True, exist_ok=True)  # text has no split field: marked held out here
        (root / rel).write_text("".join(json.dumps({**r, "orig_split": "dev"}, ensure_ascii=False) + "\n" for r in dev),
                                encoding="utf-8")
    ours_path = tmp_path / "ours.json"
    run_cli([BIN / "sabiscale", "eval", str(zero3_checkpoint), "--data", str(root), "--split", "dev",
             "--max-per-file", "4", "--generate", "4", "--out", str(ours_path)])
    ours = json.loads(ours_path.read_text())
    export = export_hf(zero3_checkpoint, tmp_path / "hf")
    proc = run_cli([BIN / "sabiscale", "eval", str(export), "--harness", "--data", str(root), "--max-per-file", "4",
                    "--out", str(tmp_path / "harness")], timeout=900)
    assert "sabiscale_translation_eng-yor: chrf" in proc.stdout
    theirs = json.loads((tmp_path / "harness" / "harness.json").read_text())["scores"]
    gen, forced = ours["generation"], ours["teacher_forced"]
    assert theirs["sabiscale_translation_eng-yor"]["chrf"] == pytest.approx(gen["translation/eng-yor"]["chrf"], abs=1e-6)
    assert theirs["sabiscale_translation_eng-yor"]["bleu"] == pytest.approx(gen["translation/eng-yor"]["bleu"], abs=1e-6)
    assert theirs["sabiscale_ner_yor"]["entity_f1"] == pytest.approx(gen["ner/yor"]["entity_f1"], abs=1e-6)
    for score in ("accuracy", "macro_f1"):
        assert theirs["sabiscale_sentiment_yor"][score] == pytest.approx(gen["sentiment/yor"][score], abs=1e-6)
    assert theirs["sabiscale_text_yor"]["bits_per_byte"] == pytest.approx(forced["text/yor"]["bits_per_byte"], rel=1e-4)
    assert (tmp_path / "harness" / "tasks" / "sabiscale_ner_yor.yaml").is_file()
    sampled = (tmp_path / "harness" / "tasks" / "data" / "sabiscale_ner_yor.jsonl").read_text().splitlines()
    written = (root / "ner" / "yor.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in sampled] == [json.loads(written[i]) for i in (0, 2, 4, 6)]


def test_eval_samples_each_file_evenly_not_its_head(shared_data):
    """The first 100 dev records of sentiment/pcm.jsonl are all negative: `--max-per-file 30`
    taken from the head would score a majority-label model perfect. Spread over the file, the
    sample holds the labels of the whole file; the harness path takes the very same records."""
    from sabiscale.config import load_config
    from sabiscale.evaluate.harness import dev_sample
    from sabiscale.prep.corpus import SplitRule, evenly_spaced, load_corpus

    assert evenly_spaced(list(range(10)), 4) == [0, 2, 5, 7] and evenly_spaced([1, 2], 4) == [1, 2]
    cfg = load_config(ROOT / "launch/recipes/shared_data.yaml", [f"data.jsonl_root={shared_data}", "data.tasks=[sentiment]",
                                                                 "data.languages=[pcm]"])
    head = load_corpus(cfg, shared_data, {"heldout"}, 30).examples
    spread = load_corpus(cfg, shared_data, {"heldout"}, 30, spread=True).examples
    assert {e.answer.strip() for e, _ in head} == {"negative"}
    assert {e.answer.strip() for e, _ in spread} >= {"negative", "positive"} and len(spread) == 30
    harness = dev_sample("sentiment", shared_data / "sentiment" / "pcm.jsonl", 30, SplitRule.of(cfg.data), None, {})
    assert [r["label"] for r in harness] == [e.answer.strip() for e, _ in spread]
