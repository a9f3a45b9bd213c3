"""Decisions that depend on the device, made in one place from facts a test can give without the
device: the precision for a compute capability, the Adam implementation DeepSpeed is handed, and
whether GPUs are present but unusable by this torch build."""
from __future__ import annotations

import copy
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path

from sabiscale.errors import UserError

# Native bf16 tensor cores start with Ampere (sm80). Before it (T4 sm75, V100 sm70, Quadro RTX
# 6000 sm75) torch reports bf16 as "supported" through emulation, which is several times slower
# than fp16 there, so fp16 with dynamic loss scaling is chosen instead.
BF16_CAPABILITY = (8, 0)


# On the CPU bf16 pays only with native bf16 dot products (AVX512-BF16 or AMX; elsewhere it is
# emulated, far slower than fp32) and only where matmuls are a large enough share of the step, a
# width that differs by CPU family (benchmarks/cpu_bf16.py, the training step bf16 vs fp32):
# - AMD EPYC, AVX512-BF16: 0.90x at width 64, 1.31x at 128, 1.67x at 256, 1.65x at 512;
# - Intel Xeon with AMX: 0.89x at 64, 0.96x at 128, 1.36x at 256, 1.56x at 512: its fp32 AVX-512
#   is stronger, so bf16 needs wider matmuls to pay for its casts around element-wise work.
CPU_BF16_MIN_HIDDEN = {"avx512_bf16": 128, "amx": 256}


def choose_precision(requested: str, device_type: str, capability: tuple[int, int] | None,
                     bf16_supported: bool = False, hidden_size: int = 0, cpu_unit: str | None = None) -> str:
    """On the CPU bf16 where it has a native bf16 unit (cpu_unit: "amx" or "avx512_bf16", as
    cpu_bf16_unit() reads it) and the model is wide enough for it to pay there, fp32 otherwise; on
    CUDA bf16 from sm80 on, fp16 below; other accelerators: bf16 where they say they have it
    (bf16_supported), else fp16."""
    if requested != "auto":
        return requested
    if device_type == "cpu":
        return "bf16" if cpu_unit is not None and hidden_size >= CPU_BF16_MIN_HIDDEN[cpu_unit] else "fp32"
    if device_type == "cuda" and capability is not None:
        return "bf16" if tuple(capability) >= BF16_CAPABILITY else "fp16"
    return "bf16" if bf16_supported else "fp16"


def cpu_bf16_unit() -> str | None:
    """This CPU's native bf16, as torch's own CPU dispatch reads it (cpuinfo): "amx" (AMX tiles,
    which torch's bf16 matmuls use first), "avx512_bf16", or None (bf16 only emulated)."""
    import torch

    for unit, probe in (("amx", "_is_amx_tile_supported"), ("avx512_bf16", "_is_avx512_bf16_supported")):
        if getattr(torch.cpu, probe, lambda: False)():
            return unit
    return None


def describe_cpu() -> str:
    """The CPU's model name and its native bf16 unit, for results pages (numbers differ by CPU)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                platform.processor() or "CPU")
    return f"{name} ({cpu_bf16_unit() or 'no native bf16'}, {os.cpu_count()} cores)"


def describe_device(device) -> str:
    """What a run trains on, for its checkpoints and the results pages read from them (a resumed
    run may have moved machines: each checkpoint names the one that wrote it)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return describe_cpu()


# Triton, inductor's GPU backend, generates code for compute capability 7.0 on.
COMPILE_CAPABILITY = (7, 0)


def choose_compile(requested: str, device_type: str, capability: tuple[int, int] | None) -> bool:
    """train.compile=auto: on CUDA GPUs Triton can target; off on the CPU, where the measured gain
    (1.05x the step rate) pays back a cold compilation only after a few hundred steps."""
    if requested != "auto":
        return requested == "on"
    return device_type == "cuda" and capability is not None and tuple(capability) >= COMPILE_CAPABILITY


AUTO_LOADER_WORKERS = 2


def choose_loader_workers(requested: int | str, device_type: str, cores_per_rank: int) -> int:
    """data.loader_workers=auto: reading and decoding off the training process where a GPU does
    the compute and cores are to spare; on the CPU the cores are the compute."""
    if requested != "auto":
        return int(requested)
    return AUTO_LOADER_WORKERS if device_type == "cuda" and cores_per_rank >= 2 + AUTO_LOADER_WORKERS else 0


def resolve_adam(ds_config: dict, fused_adam_prebuilt: bool, device_type: str) -> dict:
    """The DeepSpeed JSON with its Adam decided. DeepSpeed turns "AdamW" without offload into its
    FusedAdam, JIT-compiled from CUDA source: that needs an nvcc matching torch's CUDA, which
    pip's torch does not ship. Unless the op was prebuilt, hand DeepSpeed torch's AdamW instead
    (`torch_adam`; on CUDA its fused kernel, shipped inside the torch wheel). Offloaded optimizer
    states keep DeepSpeedCPUAdam (compiled for the CPU by `sabiscale build-ops`)."""
    optimizer = ds_config.get("optimizer") or {}
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    if optimizer.get("type", "").lower() not in ("adam", "adamw") or offload not in ("none", None):
        return ds_config
    if fused_adam_prebuilt:
        return ds_config
    out = copy.deepcopy(ds_config)
    params = out["optimizer"].setdefault("params", {})
    params.setdefault("torch_adam", True)
    params.setdefault("adam_w_mode", optimizer["type"].lower() == "adamw")
    if device_type == "cuda":
        params.setdefault("fused", True)
    return out


def fused_adam_prebuilt() -> bool:
    from deepspeed.git_version_info import installed_ops

    return bool(installed_ops.get("fused_adam"))


def read_nvidia_smi() -> tuple[str, str] | None:
    """(`nvidia-smi -L`, `nvidia-smi`) output, or None where there is no NVIDIA driver."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
        header = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return listing, header


def unusable_gpus(smi: tuple[str, str] | None, cuda_available: bool, torch_version: str,
                  torch_cuda: str | None) -> str | None:
    """Why the GPUs nvidia-smi sees cannot be used by this torch, or None when there is nothing to say."""
    if smi is None or cuda_available:
        return None
    listing, header = smi
    gpus = [line for line in listing.splitlines() if line.startswith("GPU ")]
    if not gpus:
        return None
    driver = re.search(r"Driver Version:\s*([\d.]+)", header)
    supports = re.search(r"CUDA Version:\s*([\d.]+)", header)
    build = f"is built for CUDA {torch_cuda}" if torch_cuda else "is a CPU-only build"
    wheel = f"cu{supports.group(1).replace('.', '')}" if supports else "cuXYZ"
    return (f"nvidia-smi sees {len(gpus)} GPU(s) (driver {driver.group(1) if driver else '?'}, CUDA up to "
            f"{supports.group(1) if supports else '?'}), but torch {torch_version} {build} and cannot use them: "
            "training would run on the CPU in fp32. Install a torch built for your driver's CUDA, e.g. "
            f"`.venv/bin/pip install --force-reinstall torch=={torch_version.split('+')[0]} --index-url "
            f"https://download.pytorch.org/whl/{wheel}` (or a newer driver); to train on the CPU on purpose, "
            "set engine.device=cpu")


def arch_covers(arch_list: list[str], capability: tuple[int, int]) -> bool:
    """Whether a torch build compiled for `arch_list` (torch.cuda.get_arch_list()) runs kernels on a
    GPU of `capability`: a cubin for the same major and an equal or lower minor (sm_86 runs on
    sm_89), or PTX (compute_XY) at or below it, which the driver compiles."""
    major, minor = capability
    for arch in arch_list:
        kind, _, number = arch.partition("_")
        digits = re.match(r"\d+", number)
        if digits is None:
            continue
        built = int(digits.group())
        if kind == "sm" and built // 10 == major and built % 10 <= minor:
            return True
        if kind == "compute" and built <= major * 10 + minor:
            return True
    return False


def check_gpus_run_kernels() -> None:
    """torch.cuda.is_available() is true on GPUs the build has no kernels for (a V100 under the
    cu130 build): the first kernel would die with "no kernel image". Check the arch list, then run
    one small kernel on every GPU."""
    import torch

    arch_list = torch.cuda.get_arch_list()
    for index in range(torch.cuda.device_count()):
        name, capability = torch.cuda.get_device_name(index), torch.cuda.get_device_capability(index)
        if not arch_covers(arch_list, capability):
            raise UserError(f"GPU {index} ({name}, sm_{capability[0]}{capability[1]}) has no kernels in this torch "
                            f"{torch.__version__} (built for {' '.join(arch_list)}): reinstall torch with "
                            "launch/install_torch.sh (it picks the cu126 build for GPUs older than Turing), or "
                            "TORCH_BUILD=cu126 make install")
        try:
            float(torch.ones(8, device=f"cuda:{index}").mul(2).sum())
        except RuntimeError as err:
            raise UserError(f"GPU {index} ({name}) cannot run a kernel with this torch {torch.__version__}: "
                            f"{str(err).splitlines()[0]}; reinstall torch with launch/install_torch.sh") from None


def check_accelerator(device: str) -> None:
    """At the CLI edge, before the engine starts: refuse a silent fall-back to the CPU, and GPUs
    this torch build cannot run."""
    if device == "cpu":
        return
    import torch

    problem = unusable_gpus(read_nvidia_smi(), torch.cuda.is_available(), torch.__version__, torch.version.cuda)
    if problem:
        raise UserError(problem)
    if torch.cuda.is_available():
        check_gpus_run_kernels()
