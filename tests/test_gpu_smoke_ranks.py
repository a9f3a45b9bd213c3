"""benchmarks/gpu_smoke.py under the deepspeed launcher on 2 CPU ranks (--cpu): one shared work
directory, rows in lock step, every row it can run on a CPU passes; and the offline wheelhouse's
resolution for a GPU machine."""
import json
import subprocess

import pytest

from conftest import BIN, ROOT, child_env

pytestmark = pytest.mark.integration


def test_gpu_smoke_on_two_ranks_passes_every_row_it_runs(tmp_path):
    out = tmp_path / "smoke.md"
    proc = subprocess.run([str(BIN / "deepspeed"), "--num_gpus", "2", str(ROOT / "benchmarks" / "gpu_smoke.py"), "--cpu",
                           "--profiles", "zero2", "--optimizers", "adamw", "--out", str(out)],
                          cwd=ROOT, env=child_env({"DS_ACCELERATOR": "cpu"}), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    table = out.read_text()
    assert "FAIL" not in table
    for row in ("train zero2 + adamw", "train zero2 + adamw, gradient accumulation 2",
                "resume on the same number of ranks", "resume on another number of ranks", "sabiscale train with MLflow on",
                "throughput of SabiYarn-size layers (hidden 768 x 12)", "eval on the device",
                "export + generate (transformers)"):
        assert f"| {row} | PASS |" in table, row


def test_the_gpu_wheelhouse_pins_everything_but_torch(tmp_path):
    proc = subprocess.run([str(ROOT / "launch" / "gpu_wheelhouse.sh"), str(tmp_path), "--resolve-only"],
                          env=child_env({"PYTHON": str(BIN / "python")}), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pins = (tmp_path / "requirements.txt").read_text().split()
    names = {p.split("==")[0].lower() for p in pins}
    assert {"deepspeed", "webdataset", "mlflow", "transformers", "bitsandbytes", "pytest"} <= names
    assert not {n for n in names if n == "torch" or n.startswith("nvidia-") or n == "triton"}
    assert all("==" in p for p in pins)
    assert json.loads((tmp_path / "resolved.json").read_text())["install"]
