"""A golden loss curve: the demo recipe's first steps (fp32, CPU, one rank) against a committed
reference, so a change that moves the numbers (data order, loss normalization, init, schedule)
is caught even when every other test still passes.

Regenerate only when a change of the numbers is intended, and say why in the commit:
    .venv/bin/python tests/test_golden_curve.py --write
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden" / "demo_loss_curve.json"
STEPS = 30
# Different CPUs (AVX2, AVX-512) pick different fp32 kernels; their rounding differences grow
# over steps to ~1e-5 relative. A real change of the numbers moves the curve by far more.
RTOL = 1e-3
# eval metrics kept in the golden file: the overall answer loss and one task x language pair
EVAL_KEYS = ("eval/answer_loss", "eval/bits_per_byte", "eval_translation/yor/answer_loss",
             "eval_translation/yor/bits_per_byte")


def golden_overrides(out: Path) -> list[str]:
    return [f"output_dir={out}", f"train.max_steps={STEPS}", "train.log_every=10", "tracking.enabled=false",
            "engine.precision=fp32"]


def demo_curve(out: Path, world) -> tuple[list[float], dict[str, dict[str, float]]]:
    """(train loss per step, {step: the EVAL_KEYS}) of the demo's first STEPS steps."""
    from sabiscale.config import load_config
    from sabiscale.prep.prepare import prepare
    from sabiscale.train.loop import train

    cfg = load_config(ROOT / "launch/recipes/demo.yaml", golden_overrides(out))
    prepare(cfg)
    result = train(cfg, world)
    return result.train_losses, {str(step): {k: m[k] for k in EVAL_KEYS} for step, m in result.eval_metrics.items()}


@pytest.mark.slow
def test_demo_loss_curve_matches_the_golden_curve(tmp_path, world):
    golden = json.loads(GOLDEN.read_text())
    losses, evals = demo_curve(tmp_path / "demo", world)
    assert len(losses) == len(golden["train_loss"]) == STEPS
    assert losses[-1] < losses[0] - 1.0  # it learns
    for step, (now, then) in enumerate(zip(losses, golden["train_loss"]), start=1):
        assert now == pytest.approx(then, rel=RTOL), f"step {step}: {now} vs golden {then}"
    assert sorted(evals) == sorted(golden["eval"]) == ["0", str(STEPS)]  # step 0 too
    for step, metrics in golden["eval"].items():
        assert evals[step] == pytest.approx(metrics, rel=RTOL), f"eval at step {step}"


if __name__ == "__main__" and "--write" in sys.argv:
    import tempfile

    sys.path.insert(0, str(ROOT / "tests"))
    from sabiscale.train.engine import ensure_launcher_env, init_distributed

    ensure_launcher_env()
    with tempfile.TemporaryDirectory() as tmp:
        curve, evals = demo_curve(Path(tmp) / "demo", init_distributed())
    GOLDEN.write_text(json.dumps({"recipe": "launch/recipes/demo.yaml", "overrides": golden_overrides(Path("<tmp>")),
                                  "train_loss": curve, "eval": evals}, indent=1) + "\n")
    print(f"wrote {GOLDEN}: {curve[0]:.4f} -> {curve[-1]:.4f}")
