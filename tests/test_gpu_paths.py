"""The GPU paths, proven on the CPU by the decisions and computations they rest on: the DeepSpeed
config every profile resolves to, the precision per compute capability, the message when GPUs
are present but unusable, the packed-attention metadata for flash-attention, and no gradient
work where no gradient is wanted."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

from sabiscale.config import load_config
from sabiscale.train.device import BF16_CAPABILITY, choose_precision, cpu_bf16_unit, describe_cpu, resolve_adam, unusable_gpus
from sabiscale.train.engine import fill_ds_config

ROOT = Path(__file__).resolve().parent.parent
PROFILES = sorted((ROOT / "ds_configs").glob("*.json"))


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.name)
@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_no_profile_needs_a_cuda_compiler(path, device):
    """DeepSpeed JIT-compiles FusedAdam from CUDA source for "AdamW" without offload; every
    resolved profile must instead name torch's AdamW, or DeepSpeed's CPU Adam under offload."""
    cfg = load_config(None, ["train.grad_accum_steps=2"])
    filled = fill_ds_config(json.loads(path.read_text()), cfg, 1, "bf16", str(path))
    resolved = resolve_adam(filled, fused_adam_prebuilt=False, device_type=device)
    params = resolved["optimizer"]["params"]
    offloaded = resolved["zero_optimization"].get("offload_optimizer", {}).get("device", "none") != "none"
    if offloaded:
        assert "torch_adam" not in params  # DeepSpeedCPUAdam, built for the CPU at install time
    else:
        assert params["torch_adam"] is True and params["adam_w_mode"] is True
        assert params.get("fused") is (True if device == "cuda" else None)
    assert resolve_adam(filled, fused_adam_prebuilt=True, device_type=device) == filled  # a prebuilt op is used


@pytest.mark.parametrize("requested,device,capability,bf16,expected", [
    ("auto", "cpu", None, False, "fp32"),     # a CPU without native bf16 (AVX2, AVX-512 before BF16)
    ("auto", "cuda", (7, 0), True, "fp16"),   # V100: bf16 only emulated
    ("auto", "cuda", (7, 5), True, "fp16"),   # T4, Quadro RTX 6000 24 GB
    ("auto", "cuda", (8, 0), True, "bf16"),   # A100
    ("auto", "cuda", (8, 6), True, "bf16"),   # RTX 3090 / A10 24 GB
    ("auto", "cuda", (8, 9), True, "bf16"),   # RTX 4090 / L4
    ("auto", "cuda", (9, 0), True, "bf16"),   # H100
    ("auto", "xpu", None, True, "bf16"),
    ("auto", "xpu", None, False, "fp16"),
    ("fp16", "cuda", (9, 0), True, "fp16"),   # an explicit choice is kept
    ("fp32", "cuda", (8, 0), True, "fp32"),
])
def test_precision_by_compute_capability(requested, device, capability, bf16, expected):
    assert choose_precision(requested, device, capability, bf16, hidden_size=256) == expected
    assert BF16_CAPABILITY == (8, 0)


@pytest.mark.parametrize("unit,hidden,expected", [
    ("avx512_bf16", 256, "bf16"),  # a model where matmuls dominate the step
    ("avx512_bf16", 1024, "bf16"),
    ("avx512_bf16", 128, "bf16"),  # measured 1.31x on an AMD EPYC
    ("avx512_bf16", 64, "fp32"),   # too narrow: element-wise work dominates, measured slower in bf16
    ("amx", 128, "fp32"),          # measured 0.96x on an Intel Xeon with AMX: its fp32 is stronger
    ("amx", 256, "bf16"),
    ("amx", 64, "fp32"),
    (None, 1024, "fp32"),          # emulated bf16
])
def test_cpu_precision_by_native_bf16_and_model_width(unit, hidden, expected):
    assert choose_precision("auto", "cpu", None, unit is not None, hidden, unit) == expected
    assert choose_precision("fp32", "cpu", None, unit is not None, hidden, unit) == "fp32"
    assert choose_precision("bf16", "cpu", None, False, 64) == "bf16"  # an explicit choice is kept
    # on the CPU only the unit decides: "the device says bf16" without a unit is emulated bf16
    assert choose_precision("auto", "cpu", None, True, 1024) == "fp32"


SMI_LIST = "GPU 0: NVIDIA A10G (UUID: GPU-1)\nGPU 1: NVIDIA A10G (UUID: GPU-2)\n"
SMI_HEADER = "| NVIDIA-SMI 535.104.05   Driver Version: 535.104.05   CUDA Version: 12.2     |\n"


def test_gpus_torch_cannot_use_are_named_with_the_way_out():
    message = unusable_gpus((SMI_LIST, SMI_HEADER), cuda_available=False, torch_version="2.13.0+cu130",
                            torch_cuda="13.0")
    assert "2 GPU(s)" in message and "driver 535.104.05" in message and "CUDA up to 12.2" in message
    assert "built for CUDA 13.0" in message and "whl/cu122" in message and "engine.device=cpu" in message
    cpu_build = unusable_gpus((SMI_LIST, SMI_HEADER), False, "2.13.0+cpu", None)
    assert "CPU-only build" in cpu_build
    assert unusable_gpus((SMI_LIST, SMI_HEADER), True, "2.13.0", "12.1") is None  # torch sees them
    assert unusable_gpus(None, False, "2.13.0", None) is None                    # no driver: a CPU machine
    assert unusable_gpus(("", SMI_HEADER), False, "2.13.0", None) is None         # a driver but no GPU


@pytest.mark.parametrize("capability,arch_list,covered", [
    ((7, 0), ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"], False),  # V100, cu130
    ((7, 0), ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90", "compute_90"], True),  # V100, cu126
    ((8, 9), ["sm_75", "sm_80", "sm_86", "sm_90"], True),     # 4090: sm_86 cubins run on sm_89
    ((12, 0), ["sm_50", "sm_80", "sm_90", "compute_90"], True),  # PTX at or below: the driver compiles it
    ((12, 0), ["sm_80", "sm_90a"], False),
    ((9, 0), ["sm_90a"], True)])
def test_the_accelerator_check_knows_which_gpus_a_build_runs_on(capability, arch_list, covered):
    from sabiscale.train.device import arch_covers

    assert arch_covers(arch_list, capability) is covered


def test_smoke_the_accelerator_check_passes_on_this_machine():
    from sabiscale.train.device import check_accelerator

    check_accelerator("auto")  # no NVIDIA driver here, or torch uses the GPUs: nothing to refuse


def test_zero3_builds_each_rank_its_partition_only(tmp_path):
    """Two real ranks: under ZeRO-3 neither holds the whole model at any point (zero.Init), each
    holds half, and the gathered weights equal a model built whole (same init, whatever the stage)."""
    import subprocess

    from conftest import BIN, child_env

    out = subprocess.run([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", "29763",
                          str(ROOT / "tests" / "zero3_partitions.py"), str(ROOT / "ds_configs" / "zero3_offload.json")],
                         cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    # the two ranks print to one pipe: their lines can run together, so each object is found by itself
    ranks = [json.loads(found) for found in re.findall(r'\{"rank"[^{}]*\}', out.stdout)]
    assert sorted(r["rank"] for r in ranks) == [0, 1]
    for r in ranks:
        assert r["data"] == 0 and r["identical"]
        assert r["held"] == pytest.approx(r["total"] / 2, abs=64)  # DeepSpeed pads partitions a little


def _head_problem(dtype, rows=96, hidden=32, vocab=300):
    from sabiscale.loss.head import SupervisedHead

    torch.manual_seed(0)
    head = SupervisedHead(hidden, vocab, bias=False).to(dtype)
    h = torch.randn(rows, hidden, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, vocab, (rows,))
    return head, h, targets


def test_eval_and_probes_do_no_gradient_work_under_no_grad():
    """Under torch.no_grad the head runs its logits GEMM only: not the two gradient GEMMs."""
    from torch.utils.flop_counter import FlopCounterMode

    head, h, targets = _head_problem(torch.float32)
    one_gemm = 2 * h.shape[0] * head.weight.shape[0] * h.shape[1]
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        loss_sum, losses = head(h, targets=targets, chunk=40)
    assert counter.get_total_flops() == one_gemm
    with FlopCounterMode(display=False) as counter:
        with_grad, _ = head(h, targets=targets, chunk=40)
    assert counter.get_total_flops() >= 2 * one_gemm  # logits and d hidden (+ the weight's, addmm_ is not counted)
    assert torch.equal(loss_sum, with_grad.detach())


def test_the_head_weight_gradient_runs_in_the_compute_dtype():
    """bf16 training: the weight-gradient GEMM is a bf16 GEMM (fp32 accumulation, summed over
    chunks in fp32), close to the fp32 computation on the same bf16 inputs."""
    head16, h16, targets = _head_problem(torch.bfloat16)
    head32, _, _ = _head_problem(torch.float32)
    with torch.no_grad():
        head32.weight.copy_(head16.weight.float())
    h32 = h16.detach().float().requires_grad_()
    for head, h in ((head32, h32), (head16, h16)):
        loss_sum, _ = head(h, targets=targets, chunk=40)
        loss_sum.backward()
    assert head16.weight.grad.dtype == torch.bfloat16
    for ours, exact in ((head16.weight.grad, head32.weight.grad), (h16.grad, h32.grad)):
        assert (ours.float() - exact).norm() / exact.norm() < 0.01


@pytest.mark.parametrize("skipped,loss_finite,precision,counts", [
    (False, True, "fp16", False), (True, True, "fp16", False),   # loss-scale backoff: normal with fp16
    (True, False, "fp16", True), (False, False, "fp16", True),   # a NaN loss always counts
    (True, True, "bf16", True), (True, True, "fp32", True),      # no loss scaling: a skipped step is a bad one
    (False, True, "bf16", False)])
def test_fp16_loss_scale_backoff_does_not_stop_training(skipped, loss_finite, precision, counts):
    from sabiscale.train.loop import counts_as_nonfinite

    assert counts_as_nonfinite(skipped, loss_finite, precision) is counts


def test_the_matmul_peak_probe_on_this_device_is_plausible():
    from sabiscale.track.metrics import measure_matmul_peak

    before = torch.get_rng_state()
    peak = measure_matmul_peak(torch.device("cpu"), size=512, repeats=3)
    assert 1e9 < peak < 1e14
    assert torch.equal(torch.get_rng_state(), before)  # measured again mid-run: the run's stream is left alone


def test_the_matmul_peak_probe_sizes_its_operands_to_the_device():
    """Slow products (bf16 on a CPU without native bf16: ~1 GFLOP/s) stop the doubling early, so
    the probe at each evaluation cannot stall a run; fast ones reach the full size."""
    from sabiscale.track.metrics import operands_worth_timing

    cpu = torch.device("cpu")
    assert operands_worth_timing(cpu, torch.bfloat16, 2048, product_seconds=0.0)[0].shape == (256, 256)
    assert operands_worth_timing(cpu, torch.float32, 512, product_seconds=float("inf"))[0].shape == (512, 512)
    assert operands_worth_timing(cpu, torch.float32, 128, product_seconds=float("inf"))[0].shape == (128, 128)


# (nvidia-smi's CUDA version, its GPUs' compute capabilities) of common machines -> the build
# torch 2.13's release matrix offers them (cu126: sm_50-sm_90, CUDA 12.0+ drivers; cu130:
# sm_75-sm_120, CUDA 13.0+ drivers; no cu128/cu129)
@pytest.mark.parametrize("driver_cuda,caps,expected", [
    (None, None, "pip install -q torch==2.13.0"),                  # no driver: PyPI / the local CPU wheel
    ("13.0", ["9.0"], "whl/cu130"),                                # H100, R580
    ("13.1", ["8.0", "8.0"], "whl/cu130"),                         # 2 x A100, R590
    ("12.9", ["8.9"], "whl/cu126"),                                # L4 / 4090, R575: no cu129 build exists
    ("12.8", ["8.9"], "whl/cu126"),                                # 4090, R570
    ("12.4", ["8.0"], "whl/cu126"),                                # A100 on an R550 cluster
    ("12.2", ["9.0"], "whl/cu126"),                                # H100 on R535
    ("12.2", ["7.5"], "whl/cu126"),                                # T4 on R535
    ("13.0", ["7.0"], "whl/cu126"),                                # V100 with a new driver: cu130 lacks sm_70
    ("12.8", ["12.0"], "needs torch's cu130 build"),               # RTX 5090 on R570: refused, update the driver
    ("13.0", ["12.0"], "whl/cu130"),                               # RTX 5090 on R580
    ("11.8", ["7.0"], "needs a driver for CUDA 12.0 or newer"),    # V100 on R520: refused
])
def test_make_install_picks_the_torch_build_the_driver_runs(tmp_path, driver_cuda, caps, expected):
    """launch/install_torch.sh, dry run, with a stand-in `nvidia-smi` printing a driver's header and
    its GPUs' compute capabilities (the real one needs the hardware)."""
    import os
    import subprocess

    path = "/usr/bin:/bin"
    if driver_cuda is not None:
        smi = tmp_path / "nvidia-smi"
        caps_out = "\\n".join(caps)
        smi.write_text("#!/bin/sh\n"
                       f'case "$1" in --query-gpu=*) printf "{caps_out}\\n" ;;\n'
                       f"*) echo '| NVIDIA-SMI 550.1   Driver Version: 550.1   CUDA Version: {driver_cuda} |' ;; esac\n")
        smi.chmod(0o755)
        path = f"{tmp_path}:{path}"
    out = subprocess.run([str(ROOT / "launch" / "install_torch.sh"), "pip", "--dry-run"], capture_output=True,
                         text=True, env={**os.environ, "PATH": path})
    assert expected in out.stdout + out.stderr, out.stdout + out.stderr
    refused = "needs" in expected
    assert (out.returncode == 2) is refused
    if refused:  # the message names an index URL that exists for torch 2.13
        assert "https://download.pytorch.org/whl/cu130" in out.stderr or "whl/cu126" in out.stderr
    assert "cu128" not in out.stdout + out.stderr


def test_an_explicit_torch_build_is_honoured_and_checked(tmp_path):
    import os
    import subprocess

    script = [str(ROOT / "launch" / "install_torch.sh"), "pip", "--dry-run"]
    ok = subprocess.run(script, capture_output=True, text=True, env={**os.environ, "TORCH_BUILD": "cu126"})
    assert "whl/cu126" in ok.stdout and ok.returncode == 0
    bad = subprocess.run(script, capture_output=True, text=True, env={**os.environ, "TORCH_BUILD": "cu128"})
    assert bad.returncode == 2 and "cpu, cu126, cu130 or cu132" in bad.stderr


def test_gpu_smoke_script_dry_runs_on_a_cpu(tmp_path):
    """benchmarks/gpu_smoke.py on a machine without a GPU: the CPU rows pass, the GPU rows skip and say why."""
    import subprocess

    from conftest import BIN, child_env

    out = subprocess.run([str(BIN / "python"), str(ROOT / "benchmarks" / "gpu_smoke.py"), "--out", str(tmp_path / "t.md")],
                         cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    table = (tmp_path / "t.md").read_text()
    assert "| device and decisions | PASS |" in table and "| packed attention vs masked reference (fp32) | PASS |" in table
    assert "| train zero1 + adamw | SKIP | no CUDA GPU here" in table


@pytest.mark.parametrize("precision,accumulation,expected", [
    ("bf16", 4, "fp32"), ("bf16", 1, None), ("fp32", 4, None), ("fp16", 4, None)])
def test_bf16_gradients_accumulate_in_fp32(precision, accumulation, expected):
    path = ROOT / "ds_configs" / "zero2.json"
    cfg = load_config(None, [f"train.grad_accum_steps={accumulation}"])
    filled = fill_ds_config(json.loads(path.read_text()), cfg, 2, precision, str(path))
    assert filled.get("data_types", {}).get("grad_accum_dtype") == expected


def test_loaded_optimizer_state_is_moved_where_fused_adamw_needs_it():
    """A universal-checkpoint load leaves `step` as whatever tensor DeepSpeed restored (an int64
    CPU tensor here); fused AdamW needs it float32 on the parameter's device. On the CPU the device
    is the same, so the check is of the dtype and that a fused step then runs."""
    from sabiscale.train.resume import place_optimizer_state

    param = torch.nn.Parameter(torch.randn(4, 3))
    fused = torch.optim.AdamW([param], lr=0.1, fused=True)
    param.grad = torch.ones_like(param)
    fused.step()
    fused.state[param]["step"] = torch.tensor(5)                       # as loaded
    fused.state[param]["exp_avg"] = fused.state[param]["exp_avg"].double().float()
    place_optimizer_state(fused)
    step = fused.state[param]["step"]
    assert step.dtype == torch.float32 and step.device == param.device and float(step) == 5
    fused.step()
    assert float(fused.state[param]["step"]) == 6
    plain = torch.optim.AdamW([param], lr=0.1, foreach=False)
    param.grad = torch.ones_like(param)
    plain.step()
    place_optimizer_state(plain)
    assert plain.state[param]["step"].device.type == "cpu"  # the unfused AdamW keeps `step` on the CPU


@pytest.mark.parametrize("name,precision,peak", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989e12), ("NVIDIA H100 PCIe", "bf16", 756e12),
    ("NVIDIA A100-SXM4-40GB", "bf16", 312e12), ("NVIDIA L4", "bf16", 121e12),
    ("NVIDIA GeForce RTX 4090", "bf16", 165e12), ("Tesla T4", "fp16", 65e12), ("Tesla V100-SXM2-16GB", "fp16", 125e12),
    ("Tesla T4", "bf16", None), ("Some Future GPU", "bf16", None)])
def test_mfu_on_a_gpu_is_against_its_data_sheet_peak(name, precision, peak):
    from sabiscale.track.flops import spec_peak

    assert spec_peak(name, precision) == peak


def test_gpu_smoke_lists_every_row_a_first_gpu_user_needs():
    import subprocess

    from conftest import BIN, child_env

    out = subprocess.run([str(BIN / "python"), str(ROOT / "benchmarks" / "gpu_smoke.py"), "--dry-run"], cwd=ROOT,
                         env=child_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    for row in ("gradient accumulation 2", "activation checkpointing", "fp16 with loss scaling",
                "resume on the same number of ranks", "sabiscale train with MLflow on", "throughput of the smoke model",
                "eval on the device", "export + generate"):
        assert f"| {row}" in out.stdout or row in out.stdout, row


@pytest.mark.parametrize("device_type, bf16_supported, dtype", [
    ("cpu", True, torch.float32),     # even with native bf16: short passes, fp32 scores
    ("cuda", True, torch.bfloat16),   # A100, H100, L4, 4090: as training there
    ("cuda", False, torch.float16),   # V100, T4: no native bf16
])
def test_eval_scoring_and_the_reference_run_in_the_devices_compute_dtype(device_type, bf16_supported, dtype):
    from sabiscale.model.build import for_inference, inference_dtype

    assert inference_dtype(device_type, bf16_supported) is dtype
    module = torch.nn.Linear(4, 4).train()
    ready = for_inference(module, torch.device("cpu"))
    assert ready.weight.dtype is torch.float32 and not ready.training


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.name)
def test_gradient_reduction_overlaps_backward_on_gpus_only(path):
    """overlap_comm is "auto" in every profile: on by device for CUDA, off on the CPU; a value
    written in the JSON stands."""
    from sabiscale.train.engine import fill_device_defaults

    cfg = load_config(None, [])
    raw = json.loads(path.read_text())
    assert raw["zero_optimization"]["overlap_comm"] == "auto"
    for device, expected in (("cuda", True), ("cpu", False)):
        filled = fill_device_defaults(fill_ds_config(raw, cfg, 1, "bf16", str(path)), device)
        assert filled["zero_optimization"]["overlap_comm"] is expected
    raw["zero_optimization"]["overlap_comm"] = False
    assert fill_device_defaults(fill_ds_config(raw, cfg, 1, "bf16", str(path)), "cuda")["zero_optimization"]["overlap_comm"] is False


@pytest.mark.parametrize("requested, device, cores, expected", [
    ("auto", "cuda", 8, 2),   # a GPU rank with cores to spare: reading and decoding in 2 workers
    ("auto", "cuda", 3, 0),   # too few cores per GPU: the training process reads
    ("auto", "cpu", 64, 0),   # on the CPU the cores are the compute
    (3, "cpu", 2, 3),         # a number is taken as given
])
def test_loader_workers_follow_the_device_and_its_cores(requested, device, cores, expected):
    from sabiscale.train.device import choose_loader_workers

    assert choose_loader_workers(requested, device, cores) == expected


def test_batches_from_workers_are_pinned_on_cuda(demo_cfg):
    """The training stream of a CUDA rank with loader workers asks DataLoader to pin its batches
    (built here for a CUDA world; the CPU cannot pin, so DataLoader draws unpinned, with a
    warning); a CPU rank never pins."""
    import warnings

    from sabiscale.data.batch import Vocab
    from sabiscale.shards.format import read_manifest
    from sabiscale.train.engine import World
    from sabiscale.train.run import data_streams

    cfg = demo_cfg.model_copy(deep=True)
    cfg.data.loader_workers = 1
    manifest = read_manifest(cfg.shards_dir)
    vocab = Vocab.from_manifest(manifest)
    for device, pinned in (("cuda", True), ("cpu", False)):
        loader, _ = data_streams(cfg, World(0, 0, 1, torch.device(device)), manifest, vocab, None)
        assert loader.dataset.pin_memory is pinned and loader.dataset.num_workers == 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "pin_memory ... no accelerator": this machine has none
            batch = next(loader)
        assert batch.input_ids.shape[0] == cfg.train.micro_batch_size


def test_results_pages_name_the_cpu_and_the_bf16_unit_that_decided_the_precision():
    described = describe_cpu()
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    assert model in described
    assert (cpu_bf16_unit() or "no native bf16") in described
    assert f"{os.cpu_count()} cores" in described
