"""Source adapters, declared tasks, mixing, --skip-bad and parallel shard writing, on real
../shared/data records converted into the formats people have (TSV, CoNLL, plain text)."""
from __future__ import annotations

import json
import subprocess
import unicodedata
from pathlib import Path

import pytest

from conftest import BIN, child_env, run_cli
from sabiscale.config import load_config
from sabiscale.prep.corpus import load_corpus
from sabiscale.prep.prepare import prepare
from sabiscale.shards.format import read_manifest
from sabiscale.shards.verify import verify_shards
from sabiscale.tasks import BadRecord


def _records(shared_data: Path, rel: str, n: int) -> list[dict]:
    with (shared_data / rel).open(encoding="utf-8") as f:
        return [json.loads(next(f)) for _ in range(n)]


def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def _files_cfg(tmp_path: Path, files: list[dict], *extra: str):
    return load_config(None, [f"output_dir={tmp_path / 'run'}", "data.source=files", f"data.files={json.dumps(files)}",
                              "data.seq_len=128", "data.sequences_per_shard=16", "data.val_fraction=0.1",
                              "tokenizer.vocab_size=600", *extra])


@pytest.fixture()
def formats(shared_data, tmp_path):
    """One real corpus per format: Yoruba-English TSV, Hausa CoNLL, Igbo plain text in paragraphs,
    Pidgin sentiment JSONL with other key names."""
    pairs = _records(shared_data, "translation/eng-yor.jsonl", 40)
    tsv = _write(tmp_path / "in" / "eng-yor.tsv", "english\tyoruba\n" + "".join(f"{p['src']}\t{p['tgt']}\n" for p in pairs))
    ner = _records(shared_data, "ner/hau.jsonl", 30)
    conll = _write(tmp_path / "in" / "hau.conll", "-DOCSTART- O\n\n" + "\n".join(
        "".join(f"{tok} {tag}\n" for tok, tag in zip(r["tokens"], r["tags"])) for r in ner))
    texts = _records(shared_data, "text/ibo.jsonl", 30)
    # decomposed on purpose: input is NFC-normalized
    txt = _write(tmp_path / "in" / "ibo.txt", "\n\n".join(unicodedata.normalize("NFD", t["text"]) + "\nFirst line ends."
                                                          for t in texts) + "\n")
    senti = _records(shared_data, "sentiment/pcm.jsonl", 30)
    jsonl = _write(tmp_path / "in" / "pcm.jsonl", "".join(json.dumps({"tweet": s["text"], "polarity": s["label"]},
                                                                     ensure_ascii=False) + "\n" for s in senti))
    files = [{"task": "translation", "format": "tsv", "path": str(tsv), "header": True, "columns": ["src", "tgt"],
              "lang": "yor"},
             {"task": "ner", "format": "conll", "path": str(conll), "lang": "hau"},
             {"task": "text", "format": "text", "path": str(txt), "documents": "paragraph", "lang": "ibo"},
             {"task": "diacritize", "format": "text", "path": str(txt), "documents": "paragraph", "lang": "ibo"},
             {"task": "sentiment", "format": "jsonl", "path": str(tmp_path / "in" / "*.jsonl"),
              "fields": {"text": "tweet", "label": "polarity"}, "lang": "pcm"}]
    return {"files": files, "pairs": pairs, "ner": ner, "texts": texts, "senti": senti, "txt": txt, "tsv": tsv,
            "jsonl": jsonl, "conll": conll}


def test_each_format_becomes_the_records_it_holds(formats, tmp_path):
    corpus = load_corpus(_files_cfg(tmp_path, formats["files"]), None)
    by_task: dict[str, list] = {}
    for example, where in corpus.examples:
        by_task.setdefault(example.task, []).append((example, where))
    first, where = by_task["translation"][0]
    assert (first.prompt, first.answer) == (f"<translate> {formats['pairs'][0]['src']} <yor>", f" {formats['pairs'][0]['tgt']}")
    assert where == f"{formats['tsv']}:2" and len(by_task["translation"]) == 40  # the header is line 1
    ner, where = by_task["ner"][1]
    assert ner.answer == " " + " ".join(formats["ner"][1]["tags"]) and ner.lang == "hau"
    assert where == f"{formats['conll']}:{3 + len(formats['ner'][0]['tokens']) + 1}"
    text, where = by_task["text"][0]
    assert text.answer == " " + formats["texts"][0]["text"] + "\nFirst line ends."  # NFC again, paragraph kept whole
    assert unicodedata.is_normalized("NFC", text.answer) and len(by_task["text"]) == 30
    senti = by_task["sentiment"][0][0]
    assert senti.answer == " " + formats["senti"][0]["label"] and senti.lang == "pcm"
    # Igbo has under-dots and tone marks in most paragraphs; the rest teach nothing and are counted
    assert len(by_task["diacritize"]) + corpus.not_applicable.get("diacritize", 0) == 30
    assert all(not any(unicodedata.category(c) == "Mn" for c in unicodedata.normalize("NFD", e.prompt))
               for e, _ in by_task["diacritize"])


def test_prepare_from_files_writes_verified_shards_and_records_sources(formats, tmp_path):
    cfg = _files_cfg(tmp_path, formats["files"])
    prepare(cfg)
    manifest = read_manifest(cfg.shards_dir)
    problems, _ = verify_shards(cfg.shards_dir)
    assert problems == []
    assert {s["format"] for s in manifest["sources"]} == {"tsv", "conll", "text", "jsonl"}
    assert all(len(s["sha256"]) == 64 for s in manifest["sources"]) and manifest["nfc"] is True
    assert manifest["tasks"]["diacritize"]["derive"] == {"bare": "strip_diacritics(text)"}
    assert {k.split("/")[0] for k in manifest["splits"]["train"]["counts"]["by_task_lang"]} == {
        "translation", "ner", "text", "diacritize", "sentiment"}


@pytest.mark.parametrize("name, content, files_entry, message", [
    ("bad.tsv", "a\tb\nonly one column\n", {"format": "tsv", "columns": ["src", "tgt"], "task": "translation",
                                            "lang": "yor"}, r"bad.tsv:2: 1 tab-separated column\(s\), expected 2"),
    ("bad.conll", "Ada B-PER\nwent\n\n", {"format": "conll", "task": "ner", "lang": "ibo"},
     r"bad.conll:2: a token line needs a token and a tag"),
    ("bad.txt", b"good line\nbad \xff byte\n", {"format": "text", "task": "text", "lang": "yor"},
     r"bad.txt:2: not UTF-8 \(byte 5 of the line"),
    ("bad.jsonl", '{"text": "fine"}\n', {"format": "jsonl", "task": "text"}, r"bad.jsonl:1: no language: field 'lang'"),
    ("lang.jsonl", '{"text": "fine", "lang": "xyz"}\n', {"format": "jsonl", "task": "text"},
     r"lang.jsonl:1: language 'xyz' .* add it to data.languages"),
    ("empty.jsonl", '{"text": "q", "summary": "  ", "lang": "eng"}\n', {"format": "jsonl", "task": "summarize"},
     r"empty.jsonl:1: field 'summary' is empty"),
    ("surrogate.jsonl", '{"text": "half \\ud800 a pair", "lang": "eng"}\n', {"format": "jsonl", "task": "text"},
     r"surrogate.jsonl:1: field 'text' holds a lone UTF-16 surrogate \(\\ud800\) at character 6"),
    ("list.jsonl", '{"prompt": ["say", "now"], "response": "ok", "lang": "eng"}\n',
     {"format": "jsonl", "task": "instruction"}, r"list.jsonl:1: field 'prompt' is a list \(2 items\); this task expects a string"),
])
def test_bad_input_names_file_line_and_what_to_do(tmp_path, name, content, files_entry, message):
    path = _write(tmp_path / name, content)
    cfg = _files_cfg(tmp_path, [{**files_entry, "path": str(path)}])
    with pytest.raises(BadRecord, match=message) as err:
        prepare(cfg)
    assert "--skip-bad" in str(err.value)
    assert not (tmp_path / "run" / "shards").exists()  # nothing half-written


def test_a_glob_that_matches_nothing_names_the_entry(tmp_path):
    cfg = _files_cfg(tmp_path, [{"task": "text", "path": str(tmp_path / "none" / "*.txt"), "format": "text"}])
    with pytest.raises(BadRecord, match=r"data.files\[0\].path .* matches no file"):
        prepare(cfg)


def test_skip_bad_skips_and_lists_every_bad_record(formats, tmp_path):
    good = formats["jsonl"].read_text(encoding="utf-8").splitlines()
    lines = good[:10] + ['{"tweet": "no label"}', "{broken", '{"tweet": "   ", "polarity": "neutral"}'] + good[10:]
    _write(formats["jsonl"], "\n".join(lines) + "\n")
    files = [f for f in formats["files"] if f["task"] == "sentiment"]
    recipe = _write(tmp_path / "recipe.yaml", json.dumps({"output_dir": str(tmp_path / "run"), "data": {
        "source": "files", "files": files, "seq_len": 128, "sequences_per_shard": 16, "val_fraction": 0.1},
        "tokenizer": {"vocab_size": 600}}))
    refused = subprocess.run([str(BIN / "sabiscale"), "prepare", str(recipe)], env=child_env(), capture_output=True,
                             text=True, timeout=300)
    assert refused.returncode == 2 and f"{formats['jsonl']}:11: missing field(s) ['label']" in refused.stderr
    assert "--skip-bad" in refused.stderr and not (tmp_path / "run" / "shards").exists()
    done = run_cli([str(BIN / "sabiscale"), "prepare", str(recipe), "--skip-bad"])
    assert "skipped 3 bad record(s)" in done.stdout
    listed = [json.loads(line) for line in (tmp_path / "run" / "shards" / "skipped.jsonl").read_text().splitlines()]
    assert [s["where"].rsplit(":", 1)[1] for s in listed] == ["11", "12", "13"]
    assert "not valid JSON" in listed[1]["reason"] and "is empty" in listed[2]["reason"]
    manifest = read_manifest(tmp_path / "run" / "shards")
    assert manifest["skipped"] == {"records": 3, "by_task": {"sentiment": 3}, "list": "skipped.jsonl"}
    kept = sum(v["documents"] for split in manifest["splits"].values() for v in split["counts"]["by_task_lang"].values())
    # every good record, none of the bad: in the shards, or held out, or dropped as a repeat
    assert kept + manifest["heldout_records"] + sum(manifest["dropped"].values()) == 30 and kept >= 20


def test_temperature_mixing_lifts_small_languages_and_reports_realized_tokens(shared_data, tmp_path):
    base = [f"output_dir={tmp_path / 'natural'}", "data.source=jsonl", f"data.jsonl_root={shared_data}",
            "data.tasks=[text]", "data.languages=[eng, yor]", "data.seq_len=256", "data.val_fraction=0.05",
            "tokenizer.vocab_size=800"]
    # a small language next to a large one: 20 Yoruba documents, 200 English
    root = tmp_path / "data" / "text"
    root.mkdir(parents=True)
    for lang, n in (("eng", 200), ("yor", 20)):
        (root / f"{lang}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                    for r in _records(shared_data, f"text/{lang}.jsonl", n)), encoding="utf-8")
    base[2] = f"data.jsonl_root={tmp_path / 'data'}"
    natural = load_config(None, base)
    prepare(natural)
    mixed = load_config(None, [*base, f"output_dir={tmp_path / 'mixed'}", "data.mix.temperature=5",
                               "data.mix.language_weights={eng: 1.0}"])
    prepare(mixed)
    nat_counts = read_manifest(natural.shards_dir)["splits"]["train"]["counts"]["by_task_lang"]
    manifest = read_manifest(mixed.shards_dir)
    mix = manifest["mix"]
    share = {lang: v["realized_share"] for lang, v in mix["by_language"].items()}
    natural_share = {lang: v["natural_share"] for lang, v in mix["by_language"].items()}
    assert natural_share["yor"] < 0.15 and share["yor"] > 0.35  # T=5 flattens ~1:10 to ~1:1.6
    p_yor = natural_share["yor"] ** 0.2 / (natural_share["yor"] ** 0.2 + natural_share["eng"] ** 0.2)
    assert share["yor"] == pytest.approx(p_yor, abs=0.02)
    for key, entry in mix["by_task_lang"].items():  # realized within one document of the target
        assert entry["natural_tokens"] == nat_counts[key]["tokens"]
        assert abs(entry["realized_tokens"] - entry["target_tokens"]) < 600
        # the shards hold exactly what the mix reports
        assert manifest["splits"]["train"]["counts"]["by_task_lang"][key]["tokens"] == entry["realized_tokens"]
    assert read_manifest(mixed.shards_dir)["splits"]["val"]["counts"] == read_manifest(natural.shards_dir)["splits"]["val"]["counts"]
    dropped = load_config(None, [*base, f"output_dir={tmp_path / 'dropped'}", "data.mix.language_weights={eng: 0}"])
    prepare(dropped)
    assert set(read_manifest(dropped.shards_dir)["splits"]["train"]["counts"]["by_task_lang"]) == {"text/yor"}


def test_two_workers_write_byte_identical_shards(shared_data, tmp_path):
    common = ["data.source=jsonl", f"data.jsonl_root={shared_data}", "data.max_records_per_file=60",
              "data.tasks=[translation, ner, descramble]", "data.seq_len=256", "data.sequences_per_shard=8",
              "tokenizer.vocab_size=800"]
    one = load_config(None, [*common, f"output_dir={tmp_path / 'one'}"])
    two = load_config(None, [*common, f"output_dir={tmp_path / 'two'}", "data.prepare_workers=2"])
    prepare(one)
    prepare(two)
    names = sorted(p.name for p in one.shards_dir.iterdir())
    assert len(names) > 4 and names == sorted(p.name for p in two.shards_dir.iterdir())
    for name in names:
        assert (one.shards_dir / name).read_bytes() == (two.shards_dir / name).read_bytes(), name


def test_a_reused_tokenizer_must_know_the_task_tags(demo_cfg, tmp_path):
    cfg = load_config(None, ["data.source=jsonl", f"data.jsonl_root={demo_cfg.output_dir / 'raw'}",
                             "data.tasks=[langid]", f"tokenizer.path={demo_cfg.tokenizer_path}",
                             f"output_dir={tmp_path}"])
    with pytest.raises(ValueError, match=r"lacks the special token\(s\) \['<langid>', '<language>'\]"):
        prepare(cfg)


@pytest.mark.parametrize("content, message", [(b"", r"is empty \(0 bytes\)"), (b'{"version": "1.0", "model"',
                                                                          r"is not a tokenizer.json the tokenizers")])
def test_a_broken_tokenizer_path_is_named_and_nothing_is_written(demo_cfg, tmp_path, content, message):
    broken = _write(tmp_path / "given" / "tokenizer.json", content)
    cfg = load_config(None, ["data.source=jsonl", f"data.jsonl_root={demo_cfg.output_dir / 'raw'}",
                             f"tokenizer.path={broken}", f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(ValueError, match=f"tokenizer {broken} {message}"):
        prepare(cfg)
    assert not cfg.tokenizer_path.exists() and not cfg.shards_dir.exists()
    assert broken.read_bytes() == content  # the user's file untouched


def test_shards_from_another_tokenizer_are_refused_before_training(demo_cfg, tmp_path):
    from sabiscale.train.run import check_inputs

    other = load_config(None, [f"output_dir={tmp_path}", "data.demo_examples_per_task=40", "data.seq_len=128",
                               "tokenizer.vocab_size=500"])
    prepare(other)
    mixed_up = other.model_copy(deep=True)
    mixed_up.data.shards_dir = demo_cfg.shards_dir
    with pytest.raises(ValueError, match=r"manifest.json was written with tokenizer .* re-run `sabiscale prepare`"):
        check_inputs(mixed_up)


def _all_samples(shards_dir: Path) -> dict[str, list]:
    """split -> every sample's arrays, in shard order (what the shards hold, independent of names)."""
    from sabiscale.shards.format import read_members

    out = {}
    for shard in sorted(shards_dir.glob("*.tar")):
        for key, members in sorted(read_members(shard).items()):
            out.setdefault(shard.name.split("-")[0], []).append(
                {name.split(".", 1)[1]: data for name, data in members.items()})
    return out


def _recipe_cfg(out: Path, files: list[dict], tasks: list[str]):
    recipe = _write(out.with_suffix(".yaml"), json.dumps({"output_dir": str(out), "data": {
        "source": "files", "files": files, "tasks": tasks, "seq_len": 128, "sequences_per_shard": 16,
        "val_fraction": 0.1}, "tokenizer": {"vocab_size": 600}}))
    return load_config(recipe, [])


def test_parquet_and_hf_datasets_prepare_the_same_shards_as_jsonl(shared_data, tmp_path):
    """The same real records as JSONL, as Parquet and as a `datasets` save_to_disk directory (each
    under the same name: the held-out split and derived tasks are keyed by source name and record
    number) prepare identical shards; a bad row is named by dataset, row and field."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    sentiment = _records(shared_data, "sentiment/yor.jsonl", 80)
    ner = [{**r, "words": r.pop("tokens")} for r in _records(shared_data, "ner/hau.jsonl", 60)]  # mapped by `fields`
    layouts = {}
    for fmt in ("jsonl", "parquet", "hf"):
        where = tmp_path / fmt
        for name, rows in (("sentiment_yor", sentiment), ("ner_hau", ner)):
            if fmt == "jsonl":
                _write(where / name, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            elif fmt == "parquet":
                where.mkdir(exist_ok=True)
                pq.write_table(pa.Table.from_pylist(rows), where / name, row_group_size=16)  # several row groups
            else:
                datasets.Dataset.from_list(rows).save_to_disk(str(where / name))
        layouts[fmt] = [{"task": "sentiment", "path": str(where / "sentiment_yor"), "format": fmt},
                        {"task": "ner", "path": str(where / "ner_hau"), "format": fmt, "fields": {"tokens": "words"}}]
    samples, manifests = {}, {}
    for fmt, files in layouts.items():
        cfg = _recipe_cfg(tmp_path / f"run_{fmt}", files, ["sentiment", "ner"])
        prepare(cfg)
        manifests[fmt] = read_manifest(cfg.shards_dir)
        samples[fmt] = _all_samples(cfg.shards_dir)
    assert manifests["jsonl"]["tokenizer_sha256"] == manifests["parquet"]["tokenizer_sha256"] == manifests["hf"]["tokenizer_sha256"]
    assert samples["jsonl"] == samples["parquet"] == samples["hf"] and sum(map(len, samples["jsonl"].values())) > 4
    assert [s["format"] for s in manifests["hf"]["sources"]] == ["hf", "hf"] and manifests["hf"]["sources"][0]["sha256"]

    bad = sentiment[:5] + [{**sentiment[5], "text": ["not", "a", "string"]}]
    datasets.Dataset.from_list([{**r, "text": r["text"] if isinstance(r["text"], str) else " ".join(r["text"])}
                                for r in bad[:5]] + [{**bad[5], "text": None}]).save_to_disk(str(tmp_path / "bad_hf"))
    cfg = _recipe_cfg(tmp_path / "bad", [{"task": "sentiment", "path": str(tmp_path / "bad_hf"), "format": "hf"}],
                      ["sentiment"])
    with pytest.raises(ValueError, match=rf"{tmp_path / 'bad_hf'}:6: field 'text' must be a string, got NoneType"):
        prepare(cfg)


def test_byte_fair_mixing_counts_shares_in_bytes_of_raw_text(shared_data, tmp_path):
    """data.mix.unit=bytes: temperature sampling on UTF-8 bytes of the raw text. Yoruba, which this
    English-heavy tokenizer splits into more tokens per byte, is not taken for a bigger language
    than it is: it gets more of the mix than with unit=tokens; the manifest reports both units."""
    root = tmp_path / "data" / "text"
    root.mkdir(parents=True)
    for lang, n in (("eng", 200), ("yor", 20)):
        (root / f"{lang}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                    for r in _records(shared_data, f"text/{lang}.jsonl", n)), encoding="utf-8")
    base = ["data.source=jsonl", f"data.jsonl_root={tmp_path / 'data'}", "data.tasks=[text]", "data.languages=[eng, yor]",
            "data.seq_len=256", "data.val_fraction=0.05", "tokenizer.vocab_size=800", "data.mix.temperature=3"]
    mixes = {}
    for unit in ("tokens", "bytes"):
        cfg = load_config(None, [*base, f"output_dir={tmp_path / unit}", f"data.mix.unit={unit}"])
        prepare(cfg)
        mixes[unit] = read_manifest(cfg.shards_dir)["mix"]
    by_bytes = mixes["bytes"]
    assert by_bytes["unit"] == "bytes"
    shares = by_bytes["by_language"]
    # the tokenizer splits Yoruba worse: its share of tokens is larger than its share of bytes
    assert shares["yor"]["natural_share_tokens"] > shares["yor"]["natural_share"]
    p_yor = shares["yor"]["natural_share"] ** (1 / 3)
    p_yor /= p_yor + shares["eng"]["natural_share"] ** (1 / 3)
    assert shares["yor"]["realized_share"] == pytest.approx(p_yor, abs=0.03)
    for entry in by_bytes["by_task_lang"].values():
        assert abs(entry["realized_bytes"] - entry["target_bytes"]) < 3000 and entry["realized_tokens"] > 0
    # in bytes, Yoruba ends up with a larger share of the mix than when shares are counted in tokens
    realized_bytes = {u: m["by_task_lang"]["text/yor"].get("realized_bytes") for u, m in mixes.items()}
    yor_tokens = {u: m["by_task_lang"]["text/yor"]["realized_tokens"] / sum(e["realized_tokens"] for e in m["by_task_lang"].values())
                  for u, m in mixes.items()}
    assert yor_tokens["bytes"] > yor_tokens["tokens"] and realized_bytes["tokens"] is None


@pytest.mark.parametrize("weights, message", [
    ("{pcmm: 2}", r"names language\(s\) not in the data: 'pcmm' \(did you mean 'pcm'\?\)"),
    ("{pcm: 0}", r"gives every language \(\['pcm'\]\) weight 0"),
])
def test_language_weights_are_checked_against_the_data_before_anything_is_written(formats, tmp_path, weights, message):
    files = [f for f in formats["files"] if f["task"] == "sentiment"]
    cfg = _files_cfg(tmp_path, files, f"data.mix.language_weights={weights}")
    with pytest.raises(ValueError, match=message):
        prepare(cfg)
    assert not cfg.tokenizer_path.exists() and not cfg.shards_dir.exists()


def test_near_duplicates_are_found_counted_and_listed_per_language(shared_data, tmp_path):
    """Real Yoruba sentences with planted copies: edited ones (a word added, case and punctuation
    changed) are near-duplicates, an identical one is an exact duplicate, and the same sentence in
    another language's file is kept (one index per task x language)."""
    with (shared_data / "text/yor.jsonl").open(encoding="utf-8") as f:
        originals = [r for r in map(json.loads, f) if len(r["text"].split()) >= 20][:60]
    assert len(originals) == 60
    edited = [{"text": r["text"].upper().replace(",", "") + " ni", "lang": "yor"} for r in originals[:4]]
    records = [{"text": r["text"], "lang": "yor"} for r in originals] + edited + [{"text": originals[10]["text"], "lang": "yor"}]
    yor = _write(tmp_path / "in" / "yor.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    ibo = _write(tmp_path / "in" / "ibo.jsonl", json.dumps({"text": originals[20]["text"] + " ni", "lang": "ibo"},
                                                           ensure_ascii=False) + "\n")
    files = [{"task": "text", "format": "jsonl", "path": str(p)} for p in (yor, ibo)]
    cfg = _files_cfg(tmp_path, files, "data.dedup=near", "data.heldout_fraction=0.0", "data.languages=[yor,ibo]")
    prepare(cfg)
    manifest = read_manifest(cfg.shards_dir)
    near = manifest["near_duplicates"]
    # the 4 planted, and one the corpus holds itself: its lines 7 and 10 differ by one tone mark (di / dí)
    assert near["removed"] == 5 and near["by_task_lang"] == {"text/yor": 5} and near["threshold"] == 0.8
    assert near["answers_differ"] == 5  # plain text: the text is the answer, and each copy differs a little
    assert manifest["dropped"] == {"duplicate": 1, "near_duplicate": 5}
    pairs = [json.loads(line) for line in (cfg.shards_dir / near["list"]).read_text(encoding="utf-8").splitlines()]
    # each pair is an original (line i) and its edited copy (line 61 + i), whichever of them came first into training
    assert sorted(sorted(int(p[k].rsplit(":", 1)[1]) for k in ("kept", "dropped")) for p in pairs) == [
        [1, 61], [2, 62], [3, 63], [4, 64], [7, 10]]
    assert all(p["jaccard_estimate"] >= 0.8 for p in pairs)
    assert manifest["splits"]["train"]["counts"]["by_task_lang"].get("text/ibo") or \
        manifest["splits"]["val"]["counts"]["by_task_lang"].get("text/ibo")
