"""The README runs as written: every `sh` block a user can run on one machine, in order, in a fresh
directory laid out like a clone (with ../shared beside it), with small-step overrides appended
where a command prepares or trains, so the README cannot drift from the code. Lines that need
what one machine has not (GPUs, other hosts, a Slurm cluster, `make` itself) are listed with the
test that covers them instead."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import time
import urllib.request

import pytest

from conftest import BIN, ROOT, SHARED_DATA, child_env
from sabiscale.train.engine import free_port

# a Slurm cluster, network namespaces, a clone of the README: `make test`, not `make check`
pytestmark = pytest.mark.system

# covered elsewhere: what they need is not one machine's
NOT_HERE = {
    "make demo": "the README's own command; CI runs `make test`, and tests cover the demo's stages",
    "make test": "this suite is it",
    "launch/single_node.sh": "GPUs; its launcher is the one tests/test_launch.py runs",
    "launch/multi_node.sh": "ssh to other hosts; node.sh on two network-namespace hosts in tests/test_launch.py",
    "NNODES=2": "a second host; tests/test_launch.py::test_two_hosts_one_launcher_each",
    "sbatch": "a Slurm cluster; tests/test_launch.py starts one",
    "NODES=4": "a Slurm cluster; tests/test_launch.py::test_submit_derives_cores_and_memory_from_the_profile",
    "srun": "a Slurm cluster; tests/test_launch.py::test_plain_srun_starts_one_world_of_two_ranks",
}
SMALL = ["data.max_records_per_file=30", "data.seq_len=256", "data.sequences_per_shard=64", "data.val_fraction=0.1",
         "tokenizer.vocab_size=800", "model.hidden_size=64", "model.num_layers=1", "model.num_heads=2",
         "model.intermediate_size=128", "train.micro_batch_size=4", "train.eval_batches=1", "train.eval_every=0",
         "optim.warmup_steps=1", "tracking.system_metrics=false", "train.log_every=1"]


def readme_commands() -> list[str]:
    """Every command line of every sh block, continuations joined, comments dropped."""
    blocks = re.findall(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    lines = []
    for block in blocks:
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def small(line: str) -> str:
    """The README line with overrides that keep it to seconds."""
    if line.startswith("export MLFLOW_TRACKING_URI") or line.startswith(". "):
        return line
    words = shlex.split(line)
    if "prepare" in words or "train" in words:
        steps = "train.max_steps=6" if line.startswith("deepspeed") else "train.max_steps=3"
        return f"{line} {' '.join(SMALL)} {steps}"
    if words[:2] == ["sabiscale", "eval"]:
        return f"{line} --max-per-file 10 --generate 1"
    if words[:2] == ["sabiscale", "generate"]:
        return f"{line} --max-new-tokens 4"
    if words[:2] == ["sabiscale", "export"]:  # the README exports its 2000-step run; here the run has 6 steps
        return line.replace("step_00002000", "step_00000006")
    return line


@pytest.mark.slow
def test_the_readme_runs_as_written(tmp_path):
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent")
    clone = tmp_path / "clone"
    clone.mkdir()
    for part in ("launch", "ds_configs", ".venv"):
        (clone / part).symlink_to(ROOT / part)
    # a copy: scripts there write their results beside themselves, and this run's must not land in the repository
    shutil.copytree(ROOT / "benchmarks", clone / "benchmarks", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "shared").symlink_to(SHARED_DATA.parent)
    env = child_env({"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "TOKENIZERS_PARALLELISM": "false"})
    env.pop("MLFLOW_TRACKING_URI", None)
    ran, skipped = [], []
    for line in readme_commands():
        reason = next((why for start, why in NOT_HERE.items() if line.startswith(start)), None)
        if reason:
            skipped.append((line, reason))
            continue
        if line.startswith("launch/mlflow-server.sh"):
            port = free_port()
            server = subprocess.Popen(shlex.split(line.replace(" 5000", f" {port}")), cwd=clone, env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:
                    try:
                        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                        break
                    except OSError:
                        time.sleep(0.5)
                else:
                    pytest.fail("the README's MLflow server did not answer")
                env["MLFLOW_TRACKING_URI"] = f"http://127.0.0.1:{port}"  # the README's next line
                done = subprocess.run(shlex.split(small("sabiscale train launch/recipes/shared_data.yaml "
                                                        "output_dir=runs/served")), cwd=clone, env=env,
                                      capture_output=True, text=True, timeout=600)
                assert done.returncode == 0, done.stderr[-3000:]
                assert f"http://127.0.0.1:{port}/#/experiments/" in done.stdout  # logged to the server
            finally:
                server.terminate()
                server.wait(timeout=30)
            ran.append(line)
            continue
        if line.startswith("export ") or line.startswith(". "):
            continue  # the environment is set above
        command = small(line)
        done = subprocess.run(["bash", "-c", command], cwd=clone, env=env, capture_output=True, text=True,
                              timeout=900)
        assert done.returncode == 0, f"README line failed: {line}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        ran.append(line)
    assert len(ran) >= 14, ran
    assert (clone / "runs" / "shared_data" / "checkpoints" / "step_00000006").is_dir()  # 1 rank, then 2 ranks on
    assert (clone / "runs" / "shared_data" / "hf" / "model.safetensors").is_file()
    assert (clone / "runs" / "rho1" / "checkpoints" / "step_00000003").is_dir()
    assert all(reason for _, reason in skipped)
