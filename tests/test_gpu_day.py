"""The GPU-day command's CPU dry run: every stage of both experiments (prepare inside the output
directory, the masked / all-token / FLOP-matched runs over 2 seeds, base, reference on the target
tasks, scoring the mix, continued all-token and selective runs with probes), their held-out scores
and both pages, with a tiny model on the demo corpus. A second call finds everything done."""
import json
import subprocess

import pytest

from conftest import BIN, ROOT, child_env

# several real training runs through the console script: `make test`, not `make check`
pytestmark = pytest.mark.integration


def test_the_gpu_day_dry_run_runs_every_stage_and_writes_both_pages(tmp_path):
    out = tmp_path / "gpu_day"
    command = [str(BIN / "python"), "-m", "sabiscale_analysis.gpu_day", "--dry-run", "--out", str(out)]
    done = subprocess.run(command, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    page = (out / "results" / "gpu_day.md").read_text()
    assert "CPU dry run: nothing is decided" in page and "FLOP-matched" in page
    runs = json.loads((out / "results" / "gpu_day.json").read_text())["runs"]
    assert sorted(runs) == ["all", "masked", "masked_flops"] and all(sorted(r) == ["1"] for r in runs.values())
    flops = {arm: json.loads((out / "prompt_weight" / f"{arm}-seed1" / "heldout_scores.json").read_text())["trained"]
             for arm in ("masked", "all", "masked_flops")}
    # the FLOP-matched masked run trained longer, to the all-token run's FLOPs (within one step)
    per_step = flops["masked"]["flops_seen"] / flops["masked"]["step"]
    assert flops["masked_flops"]["step"] > flops["masked"]["step"]
    assert abs(flops["masked_flops"]["flops_seen"] - flops["all"]["flops_seen"]) <= per_step
    rho1 = (out / "results" / "rho1_continued_gpu.md").read_text()
    assert "Reference quality on the target tasks" in rho1 and "selective 0.6" in rho1 and "sampled 0.6 T=1" in rho1
    assert "Token trajectories over the continued run" in rho1 and "Rho-1 (TinyLlama" in rho1
    assert len(list((out / "rho1").glob("scored_mix_reference_on_0.5_lr*/manifest.json"))) == 1
    # the base never saw the half of the target records the reference learns from
    rules = {d: json.loads((out / "rho1" / d / "shards" / "manifest.json").read_text())["split_rule"]
             for d in ("mix_without_0.5", "target_data_0.5")}
    assert rules["mix_without_0.5"]["hold_back"]["keep"] == "rest" and rules["target_data_0.5"]["hold_back"]["keep"] == "share"
    assert "held-back 0.5 share" in rho1
    # the machine is read from the base's checkpoint, not from wherever the page is rendered
    from sabiscale.train.device import describe_cpu

    assert f"bf16 unit) on {describe_cpu()} (the base's last checkpoint)" in rho1
    trajectories = (out / "results" / "rho1_continued_gpu_trajectories.md").read_text()
    assert "**Verdict (all tokens, threshold 0.2):**" in trajectories and "| sampled 0.6 T=1 | 0.4 |" in trajectories
    again = subprocess.run(command, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "already trained" in again.stdout
