"""The tracking journal keeps only what is not yet sent in memory and resumes from its saved
state, reading only the lines after it; whatever it reads, it reaches the same state as a read
from the start."""
import json

import pytest

from sabiscale.track.journal import Journal, read_journal, snapshot_path


def _fill(path, steps, sent_upto_end=True):
    journal = Journal(path)
    journal.add({"op": "start", "uri": "sqlite:///a.db", "experiment": "e", "journal_id": "j1", "time_ms": 0})
    journal.set_run("r1", "0", "sqlite:///a.db")
    for step in range(1, steps + 1):
        journal.add({"op": "metrics", "step": step, "time_ms": step, "metrics": {"train/loss": 1.0 / step}})
        if step % 50 == 0:
            journal.add({"op": "metrics", "step": step, "time_ms": step, "metrics": {"eval/answer_loss": 2.0 / step}})
        if sent_upto_end or step < steps - 10:
            journal.mark_sent(journal.state.count)
    return journal


def _full_read(path):
    """The state as a read from the first line finds it (the saved state moved away)."""
    saved = snapshot_path(path)
    aside = saved.with_name("aside")
    saved.rename(aside)
    try:
        return read_journal(path)
    finally:
        aside.rename(saved)


def test_sent_records_leave_memory_and_a_resume_reads_only_what_follows_the_saved_state(tmp_path):
    path = tmp_path / "tracking_journal.jsonl"
    journal = _fill(path, 5000, sent_upto_end=False)
    assert len(journal.state.pending) == journal.pending() == 12  # steps 4990-5000 and one eval, not 5000
    journal.close()
    saved = json.loads(snapshot_path(path).read_text())
    assert saved["offset"] < path.stat().st_size and saved["count"] >= 4000  # taken when nothing was pending
    resumed, full = read_journal(path), _full_read(path)
    assert resumed == full
    assert resumed.count == 5000 + 100 + 1 and resumed.sent == resumed.count - 12
    assert [r["step"] for r in resumed.pending if r["op"] == "metrics"][:2] == [4990, 4991]
    assert resumed.last_step == {"train/loss": 5000, "eval/answer_loss": 5000}
    assert (resumed.run_id, resumed.run_uri) == ("r1", "sqlite:///a.db")


def test_a_saved_state_of_another_or_a_cut_journal_is_not_used(tmp_path):
    path = tmp_path / "tracking_journal.jsonl"
    _fill(path, 3000).close()
    size = path.stat().st_size
    with path.open("rb+") as f:  # cut (restored from an older copy): the saved offset lies past the end
        f.truncate(size // 2)
        f.seek(0, 2)
    lines = path.read_bytes().split(b"\n")
    path.write_bytes(b"\n".join(lines[:-1]) + b"\n")
    assert read_journal(path) == _full_read(path)
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"op": "start", "uri": "u", "experiment": "e", "journal_id": "j2", "time_ms": 0}) + "\n")
    snapshot_path(path).rename(snapshot_path(other))  # a state beside a journal it does not belong to
    state = read_journal(other)
    assert state.count == 1 and state.sent == 0 and state.run_id is None


def test_a_damaged_line_in_the_middle_is_named(tmp_path):
    path = tmp_path / "tracking_journal.jsonl"
    _fill(path, 10).close()
    snapshot_path(path).unlink()
    lines = path.read_text().splitlines()
    lines[3] = "{not json"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"line 4 after byte 0 is not a journal line"):
        read_journal(path)
