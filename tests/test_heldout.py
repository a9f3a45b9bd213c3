"""Held out by construction, contamination checked: real records marked dev/test never reach a
train or validation shard (nor a copy of them); `eval` reports records that training saw and
scores the rest; shards prepared the old way are refused. Every score carries `n` and an interval."""
import json
import unicodedata

import pytest

from conftest import BIN, ROOT, run_cli, tiny_overrides
from sabiscale.config import load_config
from sabiscale.prep.prepare import prepare


def _records(path, n, **where):
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return [r for r in rows if all(r.get(k) == v for k, v in where.items())][:n]


def _write(root, rel, rows):
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture(scope="module")
def prepared(shared_data, tmp_path_factory):
    """Real Yoruba sentiment and translation records: train, dev, test, and a training record that
    repeats a dev record's text under another id (as AfriSenti's files do)."""
    root = tmp_path_factory.mktemp("data")
    senti = shared_data / "sentiment" / "yor.jsonl"
    train, dev = _records(senti, 60, orig_split="train"), _records(senti, 30, orig_split="dev")
    test = [{**r, "id": r["id"] + "-t", "orig_split": "test"} for r in _records(senti, 40, orig_split="dev")[30:]]
    copy = {**dev[0], "id": "a-copy", "orig_split": "train", "text": dev[0]["text"].upper()}  # normalised: the same text
    _write(root, "sentiment/yor.jsonl", train[:30] + [copy] + dev + test + train[30:])
    pairs = shared_data / "translation" / "eng-yor.jsonl"
    _write(root, "translation/eng-yor.jsonl", _records(pairs, 60, orig_split="train") + _records(pairs, 20, orig_split="dev"))
    out = tmp_path_factory.mktemp("run")
    cfg = load_config(ROOT / "launch/recipes/shared_data.yaml", tiny_overrides(out) + [
        f"data.jsonl_root={root}", "data.dir=null", "data.tasks=[sentiment, translation]", "data.languages=[yor]",
        "data.val_fraction=0.1", "train.max_steps=3", "train.eval_batches=1", "tracking.enabled=false"])
    prepare(cfg)
    return cfg, root, dev + test


def _shard_texts(cfg):
    """Every train and validation sequence of the shards, decoded back to text."""
    from sabiscale.data.batch import Vocab
    from sabiscale.data.loader import make_loader
    from sabiscale.prep.tokenizer import load_tokenizer
    from sabiscale.shards.format import read_manifest, split_shards

    tok, manifest = load_tokenizer(cfg.tokenizer_path), read_manifest(cfg.shards_dir)
    texts = []
    for split in ("train", "val"):
        shards = split_shards(cfg.shards_dir, manifest, split)
        n = sum(s["sequences"] for s in shards)
        for batch in make_loader(shards, Vocab.from_manifest(manifest), n, 0, 1, 0, shuffle=False):
            texts += [tok.decode(row, skip_special_tokens=True) for row in batch.input_ids.tolist()]
            break
    return texts


def _norm(text):
    return " ".join(unicodedata.normalize("NFC", text).lower().split())


def test_dev_and_test_records_and_their_copies_never_reach_a_shard(prepared):
    cfg, _, heldout = prepared
    shards = _norm(" ".join(_shard_texts(cfg)))
    assert "ẹ" in shards or "ọ" in shards  # the decoding is real Yoruba text
    assert not [r["id"] for r in heldout if _norm(r["text"]) in shards]
    manifest = json.loads((cfg.shards_dir / "manifest.json").read_text())
    senti = next(s for s in manifest["sources"] if s["task"] == "sentiment")
    assert senti["records"]["heldout"] == 40 and senti["records"]["dropped_heldout_overlap"] == 1
    assert senti["records"]["train"] + senti["records"]["val"] == 61  # the copy is counted, then dropped
    assert manifest["split_rule"]["heldout_splits"] == ["dev", "test"] and (cfg.shards_dir / "fingerprints.npz").is_file()


def test_hold_back_splits_a_tasks_training_records_between_two_data_sets_and_keeps_the_evaluation_records(prepared, tmp_path):
    """Rho-1's reference learns from target records its base never saw: keep=rest and keep=share
    part one task's training records between them, the other task and the held-out records stay."""
    from sabiscale.config import ConfigError
    from sabiscale.prep.corpus import load_corpus

    cfg, root, _ = prepared

    def splits(*hold):
        c = load_config(ROOT / "launch/recipes/shared_data.yaml", tiny_overrides(tmp_path / "run") + [
            f"data.jsonl_root={root}", "data.dir=null", "data.tasks=[sentiment, translation]",
            "data.languages=[yor]", "data.val_fraction=0.1", *hold])
        return {(e.task, where): e.split for e, where in load_corpus(c, root).examples}

    whole = splits()
    rest = splits("data.hold_back={tasks: [sentiment], share: 0.5, keep: rest}")
    share = splits("data.hold_back={tasks: [sentiment], share: 0.5, keep: share}")
    trained = {k for k, v in whole.items() if k[0] == "sentiment" and v in ("train", "val")}
    in_rest = {k for k in trained if rest[k] != "held_back"}
    in_share = {k for k in trained if share[k] != "held_back"}
    assert not in_rest & in_share and in_rest | in_share == trained  # each record goes to exactly one side
    assert 0.3 < len(in_share) / len(trained) < 0.7  # the share, by a hash (61 records)
    assert all(rest[k] == whole[k] for k in in_rest) and all(share[k] == whole[k] for k in in_share)
    for side in (rest, share):  # the evaluation records and the other task are untouched
        assert {k for k, v in side.items() if v == "heldout"} == {k for k, v in whole.items() if v == "heldout"}
        assert all(side[k] == v for k, v in whole.items() if k[0] == "translation")
    held = load_config(ROOT / "launch/recipes/shared_data.yaml", tiny_overrides(tmp_path / "held") + [
        f"data.jsonl_root={root}", "data.dir=null", "data.tasks=[sentiment, translation]", "data.languages=[yor]",
        "data.val_fraction=0.1", "data.hold_back={tasks: [sentiment], keep: share}"])
    prepare(held)
    manifest = json.loads((held.shards_dir / "manifest.json").read_text())
    senti = next(s for s in manifest["sources"] if s["task"] == "sentiment")["records"]
    assert senti["held_back"] == len(trained) - len(in_share) and manifest["split_rule"]["hold_back"]["keep"] == "share"
    with pytest.raises(ConfigError, match="data.hold_back.tasks"):
        load_config(ROOT / "launch/recipes/shared_data.yaml", ["data.tasks=[translation]",
                                                               "data.hold_back={tasks: [ner], keep: rest}"])


@pytest.fixture(scope="module")
def checkpoint(prepared, world):
    from sabiscale.train.loop import train

    return train(prepared[0], world).checkpoint


def _eval(checkpoint, out, *args):
    proc = run_cli([BIN / "sabiscale", "eval", str(checkpoint), "--split", "dev", "--max-per-file", "40",
                    "--generate", "4", "--out", str(out), *args], timeout=900)
    return proc.stdout, json.loads(out.read_text())


def test_eval_on_held_out_records_finds_no_contamination_and_reports_intervals(checkpoint, tmp_path):
    stdout, report = _eval(checkpoint, tmp_path / "dev.json")
    assert report["contamination"]["sentiment/yor"] == {"records": 40, "exact": 0, "ngram": 0, "clean": 40}
    assert all(c["exact"] == c["ngram"] == 0 for c in report["contamination"].values())
    for section in ("teacher_forced", "classification", "generation"):
        for key, scores in report[section].items():
            named = [k for k, v in scores.items() if isinstance(v, float) and not k.startswith("majority")]
            assert named and all(f"{k}_ci" in scores for k in named), (section, key)
            assert scores.get("n", scores.get("examples")) > 0
            for k in named:
                low, high = scores[f"{k}_ci"]
                assert low <= scores[k] <= high, (key, k)
    ranked = report["classification"]["sentiment/yor"]
    assert ranked["n"] == 40 and {"rank_accuracy", "rank_macro_f1", "majority_accuracy", "majority_label"} <= set(ranked)
    assert "copy_source_chrf" in report["generation"]["translation/eng-yor"]
    assert "rank classification" in stdout and "0 in training exactly" in stdout


def test_planted_training_records_are_reported_as_contaminated_and_left_out(prepared, checkpoint, tmp_path):
    """Five training records relabelled as dev in another data root: exactly those five are
    contaminated, the 20 real dev records are scored."""
    cfg, root, _ = prepared
    planted = [json.loads(line) for line in (root / "sentiment" / "yor.jsonl").read_text().splitlines()][:5]
    dev = _records(root / "sentiment" / "yor.jsonl", 20, orig_split="dev")
    other = tmp_path / "other"
    _write(other, "sentiment/yor.jsonl", [{**r, "orig_split": "dev"} for r in planted] + dev)
    _write(other, "translation/eng-yor.jsonl", _records(root / "translation" / "eng-yor.jsonl", 5, orig_split="dev"))
    stdout, report = _eval(checkpoint, tmp_path / "planted.json", "--data", str(other))
    found = report["contamination"]["sentiment/yor"]
    assert (found["records"], found["exact"] + found["ngram"], found["clean"]) == (25, 5, 20)
    assert report["classification"]["sentiment/yor"]["n"] == 20
    assert report["teacher_forced"]["sentiment/yor"]["n"] == 20
    _, everything = _eval(checkpoint, tmp_path / "all.json", "--data", str(other), "--include-contaminated")
    assert everything["include_contaminated"] and everything["teacher_forced"]["sentiment/yor"]["n"] == 25


def test_shards_prepared_the_old_way_are_refused_for_eval_and_reuse(prepared, checkpoint, tmp_path):
    import subprocess

    from conftest import child_env
    from sabiscale.errors import AlreadyExists

    cfg = prepared[0]
    manifest_path = cfg.shards_dir / "manifest.json"
    kept = manifest_path.read_text()
    old = json.loads(kept)
    old.pop("split_rule")
    try:
        manifest_path.write_text(json.dumps(old))
        proc = subprocess.run([str(BIN / "sabiscale"), "eval", str(checkpoint), "--out", str(tmp_path / "x.json")],
                              env=child_env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 2 and "prepared by an earlier sabiscale" in proc.stderr
        assert "Prepare the data again into a new data.dir" in proc.stderr and "Traceback" not in proc.stderr
        shared = cfg.model_copy(deep=True)
        shared.data.dir = cfg.output_dir
        with pytest.raises(AlreadyExists, match="prepare into a new data.dir"):
            prepare(shared)
    finally:
        manifest_path.write_text(kept)
