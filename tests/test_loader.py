import pytest
import torch

from sabiscale.data.batch import Vocab
from sabiscale.data.loader import check_resumable, make_loader as _make_loader
from sabiscale.shards.format import split_shards
from sabiscale.shards.format import read_manifest

VOCAB = Vocab(("descramble", "ner", "sentiment", "text", "translation"), ("hau", "ibo", "yor"))


def make_loader(urls, *args, **kwargs):
    return _make_loader(urls, VOCAB, *args, **kwargs)


def _urls(cfg):
    return split_shards(cfg.shards_dir, read_manifest(cfg.shards_dir), "train")


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_batches_have_the_contract_shapes(demo_cfg):
    batch = next(make_loader(_urls(demo_cfg), 4, 0, 1, seed=3, shuffle=True, num_workers=0))
    T = demo_cfg.data.seq_len
    assert batch.input_ids.shape == batch.loss_mask.shape == batch.position_ids.shape == (4, T)
    assert batch.input_ids.dtype == torch.int64 and batch.loss_mask.dtype == torch.bool
    assert batch.loss_mask[:, 1:].sum() > 0
    # every real token knows its task and language; padding is -1
    real = batch.task_ids >= 0
    assert (real == (batch.lang_ids >= 0)).all()
    assert real.sum() > 0 and (batch.task_ids[~real] == -1).all()
    assert set(batch.task_ids[real].unique().tolist()) <= set(range(len(VOCAB.tasks)))


def test_ranks_and_workers_split_one_global_stream(demo_cfg):
    urls = _urls(demo_cfg)
    single = _take(make_loader(urls, 4, 0, 1, seed=3, shuffle=True, num_workers=0), 8)
    rank0 = _take(make_loader(urls, 4, 0, 2, seed=3, shuffle=True, num_workers=2), 4)
    rank1 = _take(make_loader(urls, 4, 1, 2, seed=3, shuffle=True, num_workers=0), 4)
    assert Vocab.from_manifest(read_manifest(demo_cfg.shards_dir)) == VOCAB
    assert [b.index for b in rank0] == [0, 2, 4, 6] and [b.index for b in rank1] == [1, 3, 5, 7]
    for b in rank0 + rank1:
        assert torch.equal(b.input_ids, single[b.index].input_ids)
    keys0 = {tuple(r.tolist()) for b in rank0 for r in b.input_ids}
    keys1 = {tuple(r.tolist()) for b in rank1 for r in b.input_ids}
    assert not keys0 & keys1  # disjoint data per rank


def test_epochs_chain_and_reshuffle(demo_cfg):
    urls = _urls(demo_cfg)
    n = sum(s["sequences"] for s in read_manifest(demo_cfg.shards_dir)["splits"]["train"]["shards"])
    batches = _take(make_loader(urls, 1, 0, 1, seed=3, shuffle=True, num_workers=0), 2 * n)
    first = [tuple(b.input_ids[0].tolist()) for b in batches[:n]]
    second = [tuple(b.input_ids[0].tolist()) for b in batches[n:]]
    assert len(set(first)) == n and set(first) == set(second) and first != second


def test_each_rank_reads_only_its_own_samples(demo_cfg):
    """Bytes read by a rank are those of its own micro-batches: with 4 ranks, a quarter of what
    one rank alone reads for the same global micro-batches."""
    shards = _urls(demo_cfg)
    alone = make_loader(shards, 4, 0, 1, seed=3, shuffle=True)
    _take(alone, 16)
    quarters = [make_loader(shards, 4, r, 4, seed=3, shuffle=True) for r in range(4)]
    for stream in quarters:
        _take(stream, 4)
    assert sum(s.bytes_read for s in quarters) == alone.bytes_read
    assert all(s.bytes_read < 0.3 * alone.bytes_read for s in quarters)


def test_resume_seeks_without_reading_what_came_before(demo_cfg):
    shards = _urls(demo_cfg)
    far = make_loader(shards, 4, 0, 1, seed=3, shuffle=True, start=5000)
    batch = next(far)
    assert batch.index == 5000 and far.bytes_read < 4 * 2 * 4096  # four samples' bytes, not 5000 micro-batches'
    with_worker = make_loader(shards, 4, 0, 1, seed=3, shuffle=True, num_workers=1, start=5000)
    assert torch.equal(next(with_worker).input_ids, batch.input_ids)  # the same seek in a worker process


def test_a_checkpoint_of_the_earlier_sample_order_is_refused_with_the_way_out(demo_cfg):
    old = {"position": 10, "batch_size": 2, "seed": 3, "shuffle_buffer": 64,
           "urls": [s["path"].rsplit("/", 1)[1] for s in _urls(demo_cfg)]}
    with pytest.raises(ValueError, match="sample order of an earlier sabiscale"):
        check_resumable(old, 2, 3, True, _urls(demo_cfg))  # what training checks before it seeks


def test_exact_resume_with_workers_ranks_and_a_new_world_size(demo_cfg):
    urls = _urls(demo_cfg)
    uninterrupted = [b.index for b in _take(make_loader(urls, 2, 0, 1, seed=3, shuffle=True, num_workers=0), 24)]
    reference = _take(make_loader(urls, 2, 0, 1, seed=3, shuffle=True, num_workers=0), 24)

    # 2 ranks with 2 workers each run 3 rounds, save, and stop
    first = [make_loader(urls, 2, r, 2, seed=3, shuffle=True, num_workers=2) for r in (0, 1)]
    seen = [b for _ in range(3) for stream in first for b in [next(stream)]]
    states = [stream.state_dict() for stream in first]
    assert states[0] == states[1] and states[0]["position"] == 6

    # resume on 3 ranks (a different world size) from the saved position
    resumed = [make_loader(urls, 2, r, 3, seed=3, shuffle=True, num_workers=r % 2, start=states[0]["position"])
               for r in range(3)]
    seen += [b for _ in range(6) for stream in resumed for b in [next(stream)]]
    assert sorted(b.index for b in seen) == uninterrupted  # no repeats, no gaps
    for b in seen:
        assert torch.equal(b.input_ids, reference[b.index].input_ids) and b.keys == reference[b.index].keys


def test_a_saved_state_continues_after_the_last_batch_read(demo_cfg):
    """Read k batches, save the state, rebuild the loader from it as training does (checked, then
    a seek to its position), continue: the concatenation equals an uninterrupted read, with
    workers and ranks; another stream definition is refused."""
    urls = _urls(demo_cfg)
    uninterrupted = _take(make_loader(urls, 2, 0, 1, seed=4, shuffle=True, num_workers=0), 12)
    before = [make_loader(urls, 2, r, 2, seed=4, shuffle=True, num_workers=2) for r in (0, 1)]
    seen = [b for _ in range(2) for stream in before for b in [next(stream)]]
    state = before[0].state_dict()
    check_resumable(state, 2, 4, True, urls)
    after = [make_loader(urls, 2, r, 2, seed=4, shuffle=True, num_workers=1, start=state["position"]) for r in (0, 1)]
    seen += [b for _ in range(4) for stream in after for b in [next(stream)]]
    assert [b.index for b in seen] == list(range(12))
    assert all(torch.equal(b.input_ids, uninterrupted[b.index].input_ids) for b in seen)
    with pytest.raises(ValueError, match="seed changed since the checkpoint"):
        check_resumable(state, 2, 5, True, urls)


def test_a_truncated_or_replaced_shard_is_named_before_the_first_read(demo_cfg, tmp_path):
    """A shard cut at a 512-byte tar block boundary reads as a shorter but valid tar: the shards of
    a split are checked against the manifest's sizes when the loader is built, before any step."""
    import shutil

    shards = tmp_path / "shards"
    shutil.copytree(demo_cfg.shards_dir, shards)
    manifest = read_manifest(shards)
    entry = manifest["splits"]["train"]["shards"][0]
    victim = shards / entry["name"]
    data = victim.read_bytes()
    victim.write_bytes(data[: (len(data) // 2) // 512 * 512])  # whole blocks: tarfile sees a clean end
    with pytest.raises(ValueError, match=f"{victim}: [0-9]+ bytes, its manifest lists {entry['bytes']}"):
        split_shards(shards, manifest, "train")
    # same size, bytes changed inside a sample: the read names the shard and the sample
    victim.write_bytes(data[:600] + b"\xff" * 200 + data[800:])
    loader = make_loader(split_shards(shards, manifest, "train"), 4, 0, 1, seed=0, shuffle=False)
    with pytest.raises(ValueError, match=f"{victim}(: sample 0|:train-000000000: member .* cannot be decoded)"):
        next(loader)
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=f"{victim}: listed in"):
        split_shards(shards, manifest, "train")


def test_shards_of_the_earlier_format_are_indexed_in_place(demo_cfg, tmp_path):
    """Version-1 shards (no sample index) are refused with the way out; `sabiscale shards index`
    adds the index without touching the shards, and the loader then reads the same batches."""
    import json
    import shutil

    from conftest import BIN, run_cli

    shards = tmp_path / "shards"
    shutil.copytree(demo_cfg.shards_dir, shards)
    manifest = read_manifest(shards)
    for idx in shards.glob("*.idx.npy"):
        idx.unlink()
    old = json.loads(json.dumps(manifest))
    old["format_version"] = 1
    for split in old["splits"].values():
        for s in split["shards"]:
            del s["bytes"], s["index"]
    (shards / "manifest.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match="sabiscale shards index"):
        split_shards(shards, read_manifest(shards), "train")
    before = {p.name: p.read_bytes() for p in shards.glob("*.tar")}
    run_cli([str(BIN / "sabiscale"), "shards", "index", str(shards)])
    assert {p.name: p.read_bytes() for p in shards.glob("*.tar")} == before
    upgraded = read_manifest(shards)
    assert upgraded["format_version"] == 2 and upgraded["splits"] == manifest["splits"]
    a = next(make_loader(split_shards(shards, upgraded, "train"), 4, 0, 1, seed=1))
    b = next(make_loader(_urls(demo_cfg), 4, 0, 1, seed=1))
    assert torch.equal(a.input_ids, b.input_ids)
