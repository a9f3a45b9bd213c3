"""Every error path is a user error or a bug report: each subcommand, given bad arguments or
files, says in its first line what is wrong and where (exit 2, no traceback); an unexpected
exception is reported as sabiscale's bug with a file to send (exit 70). The JSONL reader, fed
random bytes and random JSON values, accepts a record, or refuses it naming file and line (and
under --skip-bad skips it); it never fails any other way."""
from __future__ import annotations

import json
import random

import pytest

from sabiscale.cli import BUG_EXIT, main


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    where = tmp_path_factory.mktemp("bad")
    (where / "broken.yaml").write_text("data: {seq_len: 8\n")
    (where / "twice.yaml").write_text("data:\n  seq_len: 64\ndata:\n  seq_len: 128\n")
    (where / "empty_tokenizer.json").write_text("")
    (where / "not_a_checkpoint").mkdir()
    (where / "journal.jsonl").write_text('{"op": "start"\n{"op": "metrics"}\n')
    return where


CASES = [
    # (argv, what the first line must name)
    ("prepare {bad}/none.yaml", "{bad}/none.yaml does not exist"),
    ("prepare {bad}/broken.yaml", "{bad}/broken.yaml: not valid YAML"),
    ("prepare {bad}/twice.yaml", "{bad}/twice.yaml"),
    ("prepare launch/recipes/demo.yaml data.seq_len=abc", "launch/recipes/demo.yaml: 1 problem(s)"),
    ("prepare launch/recipes/demo.yaml nokey=1", "launch/recipes/demo.yaml: 1 problem(s)"),
    ("prepare launch/recipes/demo.yaml data.val_fraction=0", "launch/recipes/demo.yaml: 1 problem(s)"),
    ("prepare launch/recipes/demo.yaml output_dir={bad}/run tokenizer.path={bad}/empty_tokenizer.json",
     "tokenizer {bad}/empty_tokenizer.json is empty"),
    ("train {bad}/none.yaml", "{bad}/none.yaml does not exist"),
    ("train launch/recipes/demo.yaml output_dir={bad}/nothing_prepared data.dir={bad}/nothing_prepared",
     "{bad}/nothing_prepared"),
    ("plan {bad}/none.yaml", "{bad}/none.yaml does not exist"),
    ("tasks {bad}/none.yaml", "{bad}/none.yaml does not exist"),
    ("tokenizer report launch/recipes/demo.yaml --tokenizer {bad}/empty_tokenizer.json",
     "tokenizer {bad}/empty_tokenizer.json is empty"),
    ("shards verify {bad}/not_a_checkpoint", "{bad}/not_a_checkpoint/manifest.json does not exist"),
    ("shards index {bad}/not_a_checkpoint", "{bad}/not_a_checkpoint/manifest.json does not exist"),
    ("eval {bad}/not_a_checkpoint", "{bad}/not_a_checkpoint is not a sabiscale checkpoint"),
    ("generate {bad}/not_a_checkpoint hello", "{bad}/not_a_checkpoint is not a sabiscale checkpoint"),
    ("export {bad}/not_a_checkpoint {bad}/exported", "{bad}/not_a_checkpoint is not a sabiscale checkpoint"),
    ("tracking sync {bad}/not_a_checkpoint", "{bad}/not_a_checkpoint/tracking_journal.jsonl does not exist"),
    ("tracking sync {bad}/journal.jsonl", "{bad}/journal.jsonl: line 1 after byte 0 is not a journal line"),
    ("analyze {bad}/not_a_checkpoint", "{bad}/not_a_checkpoint/probe/meta.npz does not exist"),
]


@pytest.mark.parametrize("argv, named", CASES, ids=[c[0].split(" {")[0].split(" launch")[0] + f"-{i}"
                                                     for i, c in enumerate(CASES)])
def test_bad_arguments_get_one_line_naming_what_and_where(bad, capsys, argv, named):
    code = main(argv.format(bad=bad).split())
    err = capsys.readouterr().err
    first = err.strip().splitlines()[-1] if "error:" not in err else next(
        line for line in err.splitlines() if "error:" in line)
    assert code == 2, err
    assert "Traceback" not in err
    assert first.startswith(f"sabiscale {argv.split()[0]}: error: ") and named.format(bad=bad) in first, err
    assert not (bad / "exported").exists() and not (bad / "run" / "tokenizer").exists()  # nothing written


def test_an_unexpected_exception_is_reported_as_a_bug_with_its_traceback_in_a_file(capsys, monkeypatch):
    from sabiscale import cli

    def broken(args):
        raise KeyError("an internal key")

    args = cli.parse(["tasks"])
    args.func = broken  # a subcommand with a bug in it
    monkeypatch.setattr(cli, "parse", lambda argv: args)
    code = cli.main(["tasks"])
    err = capsys.readouterr().err
    assert code == BUG_EXIT and "Traceback" not in err
    assert "internal error (a bug in sabiscale, not a problem with your input): KeyError" in err
    saved = err.split("The traceback is in ")[1].split(";")[0]
    assert "Traceback" in open(saved, encoding="utf-8").read() and "an internal key" in open(saved).read()


def _random_value(rng: random.Random, depth: int = 0):
    kinds = ["str", "int", "float", "bool", "null", "list", "dict", "weird"] if depth < 3 else ["str", "int", "null"]
    kind = rng.choice(kinds)
    if kind == "str":
        return "".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(0x80, 0x3000), 0xD800, 0x0])) for _ in
                       range(rng.randrange(0, 12)))
    if kind == "int":
        return rng.choice([0, -1, 10**30, rng.randrange(-1000, 1000)])
    if kind == "float":
        return rng.choice([0.5, -1e308, float("nan"), float("inf")])
    if kind == "bool":
        return rng.choice([True, False])
    if kind == "null":
        return None
    if kind == "list":
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(0, 4))]
    if kind == "dict":
        keys = ["text", "lang", "src", "tgt", "tokens", "tags", "label", "orig_split", "x"]
        return {rng.choice(keys): _random_value(rng, depth + 1) for _ in range(rng.randrange(0, 6))}
    return rng.choice(["", "  ", "<translate>", "<yor>", "\u200b", "a\ud800b"])


def _random_line(rng: random.Random) -> bytes:
    if rng.random() < 0.3:  # raw bytes: broken UTF-8, control characters, half a JSON object
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40))).replace(b"\n", b" ")
    record = _random_value(rng)
    if rng.random() < 0.7 or not isinstance(record, dict):
        record = {"text": _random_value(rng), "lang": rng.choice(["yor", "hau", "eng", "xx", 3]),
                  "tokens": _random_value(rng), "tags": _random_value(rng), "label": _random_value(rng),
                  "src": _random_value(rng), "tgt": _random_value(rng)}
    return json.dumps(record, ensure_ascii=rng.random() < 0.5, allow_nan=True).encode("utf-8", "surrogatepass")


@pytest.mark.parametrize("task", ["text", "ner", "sentiment", "translation"])
def test_fuzzed_jsonl_records_are_accepted_refused_by_file_and_line_or_skipped(tmp_path, task):
    from sabiscale.config import load_config
    from sabiscale.prep.corpus import load_corpus
    from sabiscale.tasks import BadRecord

    rng = random.Random(hash(task) % 1000)
    lines = [_random_line(rng) for _ in range(300)]
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    files = [{"task": task, "format": "jsonl", "path": str(path), "lang": "yor"}]
    strict = load_config(None, [f"output_dir={tmp_path / 'run'}", "data.source=files", f"data.files={json.dumps(files)}"])
    for line_no in range(1, len(lines) + 1):  # each line alone: accepted, or refused naming it
        single = tmp_path / f"line{line_no}.jsonl"
        single.write_bytes(lines[line_no - 1] + b"\n")
        one = strict.model_copy(deep=True)
        one.data.files[0].path = str(single)
        try:
            load_corpus(one, None)
        except BadRecord as err:
            assert f"{single}:1" in str(err), str(err)
    lenient = strict.model_copy(deep=True)
    lenient.data.skip_bad = True
    corpus = load_corpus(lenient, None)
    kept = len(corpus.examples) + sum(corpus.not_applicable.values())
    assert corpus.skipped and all(s["where"].startswith(f"{path}:") for s in corpus.skipped)
    assert kept + len(corpus.skipped) <= len(lines)
