"""Process set-up shared by the console script, the benchmarks and the tests: the compiled-ops
toolchain, quiet libraries, logging, and the few environment facts read at the edge (launcher
rank, MLflow's HTTP retry policy). Nothing below the commands reads the environment."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path


def use_environment_toolchain() -> None:
    """DeepSpeed's JIT ops compile against this environment's torch and headers: keep their cache
    per environment, and build them always with this environment's ninja. Two ninja versions
    (say Debian's 1.11 and PyPI's 1.13) disagree on their build log and rebuild every op (~2 min)
    each time the other one ran."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    env_bin = str(Path(sys.executable).parent)
    if os.environ.get("PATH", "").split(os.pathsep)[0] != env_bin:
        os.environ["PATH"] = env_bin + os.pathsep + os.environ.get("PATH", "")


def fail_fast_tracking() -> None:
    """MLflow's HTTP client retries a dead server for minutes by default; training must not wait
    that long per metric (the tracker keeps metrics and retries on its own schedule)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def quiet_libraries() -> None:
    """sabiscale's own lines stay visible: MLflow's store INFO lines, DeepSpeed's accelerator
    guess (it is told instead) and torch's deprecation notices from inside DeepSpeed are off."""
    import warnings

    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        os.environ["DS_ACCELERATOR"] = "cuda" if torch.cuda.is_available() else "cpu"


def setup_logging(rank: int) -> None:
    """sabiscale's own lines on rank 0 at INFO; libraries (DeepSpeed, MLflow, compilers) only warn."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stdout, force=True)
    logging.getLogger("sabiscale").setLevel(logging.INFO if rank == 0 else logging.WARNING)


class DropNotices(logging.Filter):
    """DeepSpeed lines that say nothing to a sabiscale user."""

    NOTICES = ("Attempting to get learning rate from scheduler before it has started",)

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(n in record.getMessage() for n in self.NOTICES)


def global_rank() -> int:
    """This process's rank as the launcher (or Slurm) gave it, before the process group exists."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def recipe_config(args: argparse.Namespace):
    """The run's typed config: the recipe, its key=value overrides, and paths the environment sets."""
    from sabiscale.config import load_config, resolve_paths

    overrides = list(args.overrides) + (["train.resume=must"] if getattr(args, "resume", False) else [])
    return resolve_paths(load_config(args.recipe, overrides), os.environ)


def eval_device():
    """The GPU where torch sees one (inference runs there), else the CPU."""
    import torch

    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def add_recipe_arguments(parser: argparse.ArgumentParser, optional: bool = False) -> None:
    parser.add_argument("recipe", nargs="?" if optional else None, default=None, help="YAML recipe (launch/recipes/)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=50")
