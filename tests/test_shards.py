import io
import re
import json
import tarfile

import numpy as np
import pytest

from sabiscale.config import load_config
from sabiscale.prep.prepare import prepare
from sabiscale.shards.pack import Document, PackStats, pack_documents
from sabiscale.hashing import sha256_file
from sabiscale.shards.format import read_manifest


def _doc(n, first_answer, task="t", lang="l"):
    mask = np.zeros(n, np.uint8)
    mask[first_answer:] = 1
    return Document(np.arange(10, 10 + n, dtype=np.uint32), mask, task, lang)


def test_packing_keeps_boundaries_and_pads():
    stats = PackStats()
    seqs = list(pack_documents([_doc(5, 2), _doc(4, 1), _doc(6, 3)], seq_len=10, pad_id=1, stats=stats))
    assert len(seqs) == 2
    first = seqs[0]
    assert first.position_ids.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 0]
    assert first.loss_mask.tolist() == [0, 0, 1, 1, 1, 0, 1, 1, 1, 0]
    assert first.input_ids[-1] == 1 and [d[:2] for d in first.docs] == [[0, 5], [5, 4]]
    assert (stats.sequences, stats.tokens, stats.padding, stats.split_documents) == (2, 15, 5, 0)


def test_long_documents_are_split_and_counted():
    stats = PackStats()
    doc = _doc(25, 0)
    seqs = list(pack_documents([doc], seq_len=10, pad_id=1, stats=stats))
    assert stats.split_documents == 1 and len(seqs) == 3
    assert all(s.position_ids[0] == 0 and s.loss_mask[0] == 0 for s in seqs)  # first token of a piece never a target
    assert np.concatenate([s.input_ids[:d[1]] for s in seqs for d in s.docs]).tolist() == doc.ids.tolist()


def _read_tar(path):
    members = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            members[m.name] = tar.extractfile(m).read()
    return members


def test_manifest_matches_shard_contents(demo_cfg):
    manifest = read_manifest(demo_cfg.shards_dir)
    split = manifest["splits"]["train"]
    supervised = tokens = sequences = 0
    for shard in split["shards"]:
        path = demo_cfg.shards_dir / shard["name"]
        assert sha256_file(path) == shard["sha256"]
        members = _read_tar(path)
        keys = {name.split(".")[0] for name in members}
        assert len(keys) == shard["sequences"]
        for key in keys:
            ids = np.load(io.BytesIO(members[f"{key}.input_ids.npy"]), allow_pickle=False)
            mask = np.load(io.BytesIO(members[f"{key}.loss_mask.npy"]), allow_pickle=False)
            pos = np.load(io.BytesIO(members[f"{key}.position_ids.npy"]), allow_pickle=False)
            docs = json.loads(members[f"{key}.docs.json"])
            assert ids.dtype == np.uint32 and mask.dtype == np.uint8 and pos.dtype == np.int32
            assert ids.shape == mask.shape == pos.shape == (demo_cfg.data.seq_len,)
            supervised += int(mask.sum())
            tokens += sum(d[1] for d in docs)
            sequences += 1
    counts = split["counts"]
    assert (counts["supervised_tokens"], counts["tokens"], counts["sequences"]) == (supervised, tokens, sequences)
    assert sum(v["supervised_tokens"] for v in counts["by_task_lang"].values()) == supervised
    assert {k.split("/")[0] for k in counts["by_task_lang"]} == set(demo_cfg.data.tasks)
    assert manifest["nfc"] is True and len(manifest["tokenizer_sha256"]) == 64


def test_same_inputs_give_byte_identical_shards(demo_cfg, tmp_path):
    again = demo_cfg.model_copy(deep=True)
    again.output_dir = tmp_path / "again"
    prepare(again)
    for name in ["manifest.json", *(s["name"] for s in read_manifest(demo_cfg.shards_dir)["splits"]["train"]["shards"])]:
        assert (demo_cfg.shards_dir / name).read_bytes() == (again.shards_dir / name).read_bytes(), name
    assert demo_cfg.tokenizer_path.read_bytes() == again.tokenizer_path.read_bytes()


def test_prepare_on_missing_data_root_is_a_clear_error(tmp_path):
    cfg = load_config(None, [f"output_dir={tmp_path}", "data.source=jsonl", f"data.jsonl_root={tmp_path / 'nope'}"])
    with pytest.raises(ValueError, match="is not a directory"):
        prepare(cfg)


def _copy_shards(demo_cfg, dest):
    import shutil

    shutil.copytree(demo_cfg.shards_dir, dest)
    return dest


def test_verify_accepts_intact_shards(demo_cfg):
    from sabiscale.shards.verify import verify_shards

    problems, totals = verify_shards(demo_cfg.shards_dir)
    assert problems == []
    assert totals["train"]["supervised_tokens"] == read_manifest(demo_cfg.shards_dir)["splits"]["train"]["counts"]["supervised_tokens"]


def test_verify_names_shard_and_member_of_each_problem(demo_cfg, tmp_path):
    from sabiscale.shards.verify import verify_shards

    shards = _copy_shards(demo_cfg, tmp_path / "shards")
    names = [s["name"] for s in read_manifest(shards)["splits"]["train"]["shards"]]
    # 1. truncate one shard
    data = (shards / names[0]).read_bytes()
    (shards / names[0]).write_bytes(data[: len(data) // 2])
    # 2. rewrite a sample of another with a wrong dtype
    with tarfile.open(shards / names[1]) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    victim = members[0][0].name.split(".")[0]
    with tarfile.open(shards / names[1], "w") as tar:
        for m, payload in members:
            if m.name == f"{victim}.input_ids.npy":
                buf = io.BytesIO()
                np.save(buf, np.zeros(demo_cfg.data.seq_len, dtype=np.int64))
                payload = buf.getvalue()
                m.size = len(payload)
            tar.addfile(m, io.BytesIO(payload))
    # 3. a stray shard
    (shards / "train-999999.tar").write_bytes(b"")
    problems, _ = verify_shards(shards)
    text = "\n".join(problems)
    assert f"{names[0]}: sha256 differs" in text
    # tarfile stops quietly at a cut between blocks: the shortfall shows as the sample count
    assert f"{names[0]}: not a readable tar" in text or re.search(rf"{names[0]}: \d+ samples, manifest.json says 32", text)
    assert f"{names[1]}: member {victim}.input_ids.npy is int64[{demo_cfg.data.seq_len}], expected uint32" in text
    assert "train-999999.tar: a shard not listed in manifest.json" in text


def test_verify_command_exit_codes(demo_cfg, tmp_path):
    import subprocess

    from conftest import BIN, run_cli

    assert "every shard matches" in run_cli([BIN / "sabiscale", "shards", "verify", str(demo_cfg.shards_dir)]).stdout
    shards = _copy_shards(demo_cfg, tmp_path / "shards")
    name = read_manifest(shards)["splits"]["val"]["shards"][0]["name"]
    (shards / name).unlink()
    proc = subprocess.run([BIN / "sabiscale", "shards", "verify", str(shards)], capture_output=True, text=True)
    assert proc.returncode == 1 and f"{name}: listed in manifest.json but missing" in proc.stderr


def test_verify_names_a_sample_index_that_does_not_fit_its_shard(demo_cfg, tmp_path):
    import shutil

    import numpy as np

    from sabiscale.shards.verify import verify_shards

    shards = tmp_path / "shards"
    shutil.copytree(demo_cfg.shards_dir, shards)
    assert verify_shards(shards)[0] == []
    index = shards / "train-000000.tar.idx.npy"
    spans = np.load(index)
    spans[1, 1] += 512  # the second sample's span runs into the third
    np.save(index, spans)
    problems, _ = verify_shards(shards)
    assert problems == [f"train-000000.tar.idx.npy: does not point at the samples of train-000000.tar in order; "
                        f"run `sabiscale shards index {shards}`"]
