"""docs/faults.md is measured: every row names a test that exists, and the rows no other test file
covers are proven here, on one tiny real checkpoint and the demo shards."""
from __future__ import annotations

import ast
import json
import re
import shutil

import numpy as np
import pytest

from conftest import ROOT, fresh_run_dir
from sabiscale.errors import UserError

TABLE = ROOT / "docs" / "faults.md"


def _defined_tests(path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef) and node.name.startswith("test")}


def _rows() -> list[tuple[str, str]]:
    """(fault, test cell) of every table row."""
    rows = []
    for line in TABLE.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) >= 3 and not set(cells[0]) <= {"-"} and cells[0] != "fault":
            rows.append((cells[0], cells[-1]))
    return rows


def test_every_row_of_the_fault_table_names_a_test_that_exists():
    rows = _rows()
    assert len(rows) >= 30
    for fault, cell in rows:
        named = re.findall(r"`([^`]*::[^`\[]*)", cell)
        tests = [tuple(ref.split("::", 1)) for ref in named]
        assert tests, f"row {fault!r} names no test"
        for where, name in tests:
            assert where and where.startswith("tests/"), f"row {fault!r} points at {where}::{name}, not at a test"
            assert name in _defined_tests(ROOT / where), f"row {fault!r}: {where} defines no {name}"


@pytest.fixture(scope="module")
def trained(demo_cfg, tmp_path_factory):
    """A 2-step run of the demo recipe: (its config, its checkpoint)."""
    from sabiscale.train.engine import ensure_launcher_env, init_distributed
    from sabiscale.train.loop import train

    ensure_launcher_env()
    cfg = demo_cfg.model_copy(deep=True)
    cfg.output_dir = fresh_run_dir(demo_cfg, tmp_path_factory.mktemp("faults") / "run")
    cfg.tracking.enabled = False
    cfg.train.max_steps, cfg.optim.warmup_steps, cfg.train.eval_batches = 2, 1, 1
    return cfg, train(cfg, init_distributed()).checkpoint


def _copy(trained, tmp_path):
    cfg, checkpoint = trained
    copy = cfg.model_copy(deep=True)
    copy.output_dir = tmp_path / "run"
    shutil.copytree(cfg.output_dir, copy.output_dir)
    return copy, copy.checkpoint_dir / checkpoint.name


def _edit_sidecar(tag_dir, change) -> None:
    sidecar = tag_dir / "sabiscale.json"
    meta = json.loads(sidecar.read_text())
    change(meta)
    sidecar.write_text(json.dumps(meta))


def test_a_checkpoint_of_another_tokenizer_is_refused_on_resume_naming_both(trained, tmp_path):
    from sabiscale.train.engine import init_distributed
    from sabiscale.train.loop import train

    cfg, tag_dir = _copy(trained, tmp_path)
    _edit_sidecar(tag_dir, lambda meta: meta.update(tokenizer_sha256="ab" * 32))
    cfg.train.max_steps = 3
    with pytest.raises(UserError, match=r"trained with tokenizer abababababab, but the shards in .* use [0-9a-f]{12}"):
        train(cfg, init_distributed())


def test_resume_never_over_checkpoints_is_refused_and_nothing_is_overwritten(trained, tmp_path):
    from sabiscale.train.engine import init_distributed
    from sabiscale.train.loop import train

    cfg, tag_dir = _copy(trained, tmp_path)
    before = {p: p.stat().st_mtime_ns for p in tag_dir.rglob("*")}
    cfg.train.resume, cfg.train.max_steps = "never", 3
    with pytest.raises(UserError, match=r"already holds checkpoints \(newest step_00000002\) and train.resume is 'never'"):
        train(cfg, init_distributed())
    assert {p: p.stat().st_mtime_ns for p in tag_dir.rglob("*")} == before


def test_a_sidecar_that_is_not_json_is_named(trained, tmp_path):
    from sabiscale.train.checkpoint import load_trained_lm

    _, tag_dir = _copy(trained, tmp_path)
    (tag_dir / "sabiscale.json").write_text("{not json")
    with pytest.raises(UserError, match=re.escape(str(tag_dir / "sabiscale.json"))):
        load_trained_lm(tag_dir)


def test_weights_that_do_not_fit_the_sidecar_model_are_named(trained, tmp_path):
    from sabiscale.train.checkpoint import load_trained_lm

    _, tag_dir = _copy(trained, tmp_path)
    _edit_sidecar(tag_dir, lambda meta: meta["config"]["model"].update(intermediate_size=96))
    with pytest.raises(UserError, match=rf"{re.escape(str(tag_dir))}.*sidecar copied from another run"):
        load_trained_lm(tag_dir)


def test_prepare_over_existing_shards_is_refused_and_nothing_is_overwritten(demo_cfg, tmp_path):
    from sabiscale.prep.prepare import prepare

    cfg = demo_cfg.model_copy(deep=True)
    cfg.output_dir, cfg.data.dir = tmp_path / "other", None
    cfg.data.shards_dir = demo_cfg.shards_dir
    before = {p: p.stat().st_mtime_ns for p in demo_cfg.shards_dir.iterdir()}
    with pytest.raises(UserError, match=r"already holds shards"):
        prepare(cfg)
    assert {p: p.stat().st_mtime_ns for p in demo_cfg.shards_dir.iterdir()} == before


def test_a_sample_with_a_missing_member_or_uneven_fields_names_shard_and_key(demo_cfg):
    from sabiscale.shards.format import decode_sample, npy_bytes, read_members

    shard = sorted(demo_cfg.shards_dir.glob("train-*.tar"))[0]
    key, members = next(iter(read_members(shard).items()))
    raw = {name.split(".", 1)[1]: data for name, data in members.items()} | {"__url__": str(shard), "__key__": key}
    decode_sample(raw)  # the sample as written is fine
    with pytest.raises(UserError, match=rf"{re.escape(str(shard))}:{key}: member loss_mask.npy is missing"):
        decode_sample({k: v for k, v in raw.items() if k != "loss_mask.npy"})
    short = {**raw, "loss_mask.npy": npy_bytes(np.zeros(3, dtype=np.uint8))}
    with pytest.raises(UserError, match=rf"{re.escape(str(shard))}:{key}: fields have different lengths"):
        decode_sample(short)
