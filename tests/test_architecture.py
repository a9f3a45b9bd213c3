"""The house rules that keep sabiscale readable, checked: short functions, one owner of the shard
format, no test or benchmark fields in the user's config, a library that stands alone, and a loss
kind that is one class (a toy kind defined here trains through the real engine)."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from conftest import fresh_run_dir

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = ROOT / "sabiscale"
MAX_FUNCTION_LINES = 80


def _sources(folder: Path):
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_function_fits_on_a_page():
    long = []
    for path in _sources(LIBRARY):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}::{node.name} ({lines} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_the_training_loop_and_its_step_are_short():
    from sabiscale.train import loop, step

    for module, name in ((loop, "train_loop"), (step, "train_step")):
        tree = ast.parse(Path(module.__file__).read_text())
        found = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
        assert found.end_lineno - found.lineno + 1 <= 65, name


# The stages in dependency order (the data flow, except that the shard format sits below `prepare`,
# which writes it); a module may import its own stage, an earlier stage and the root modules. Root modules (config, errors, tasks, ...) import no stage, except
# the console script (the edge) and the pairs listed in ALLOWED_UPWARD.
STAGE_ORDER = ["shards", "prep", "data", "model", "loss", "track", "train", "evaluate", "publish"]
EDGE = {"cli", "__main__", "runtime"}
# config validates `loss.kind` against the registry of loss kinds (one class per kind, in loss/):
# the one lookup that runs up the stage order, by design.
ALLOWED_UPWARD = {("config", "loss")}


def _imports_between_parts():
    """(importing part, imported part, file) for every sabiscale import between two parts."""
    for path in _sources(LIBRARY):
        rel = path.relative_to(LIBRARY).parts
        src = rel[0] if len(rel) > 1 else path.stem
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sabiscale."):
                dst = node.module.split(".")[1]
                if dst != src:
                    yield src, dst, str(path.relative_to(ROOT))


def test_imports_follow_the_stage_order():
    upward = set()
    for src, dst, where in _imports_between_parts():
        if src in EDGE:
            continue
        if src not in STAGE_ORDER:  # a root module
            if dst in STAGE_ORDER:
                upward.add((src, dst, where))
        elif dst in STAGE_ORDER and STAGE_ORDER.index(dst) > STAGE_ORDER.index(src):
            upward.add((src, dst, where))
    unexpected = {u for u in upward if u[:2] not in ALLOWED_UPWARD}
    assert not unexpected, f"imports that run back up the stage order: {sorted(unexpected)}"
    assert len(ALLOWED_UPWARD) <= 1


def test_every_stage_with_a_command_registers_it_in_its_commands_module():
    from sabiscale import cli

    assert len((LIBRARY / "__main__.py").read_text().splitlines()) <= 150
    assert len((LIBRARY / "cli.py").read_text().splitlines()) <= 150
    registered = {stage.__name__ for stage in cli.STAGES}
    on_disk = {f"sabiscale.{p.parent.name}.commands" for p in LIBRARY.glob("*/commands.py")}
    assert registered == on_disk
    for folder in (ROOT / "tests", ROOT / "benchmarks", ROOT / "analysis"):
        for path in _sources(folder):
            assert not re.search(r"^\s*(from sabiscale\.__main__ import|import sabiscale\.__main__)", path.read_text(), re.M), path


def test_package_docstrings_name_only_modules_that_exist():
    for init in LIBRARY.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        named = set(re.findall(r"\(([a-z_]+(?:, [a-z_]+)*)[,)]", doc))
        modules = {m for group in named for m in group.split(", ")}
        missing = {m for m in modules if not (init.parent / f"{m}.py").is_file()}
        assert not missing, f"{init.relative_to(ROOT)} names modules that do not exist: {sorted(missing)}"
        listed = {p.stem for p in init.parent.glob("*.py")} - {"__init__"}
        assert listed <= modules, f"{init.relative_to(ROOT)} does not name {sorted(listed - modules)}"


def test_no_fault_or_benchmark_fields_in_the_user_config():
    from sabiscale.config import RunConfig
    from sabiscale.train.loop import TrainResult

    names = {f"{section}.{name}" for section, field in RunConfig.model_fields.items()
             if hasattr(field.annotation, "model_fields") for name in field.annotation.model_fields}
    assert not {n for n in names if re.search(r"fault|kill|step_times|bench", n)}, names
    assert not {"step_times", "step_counts", "step_flops"} & set(TrainResult.__dataclass_fields__)


def test_one_module_encodes_and_decodes_samples():
    hits = sorted({str(p.relative_to(ROOT)) for p in _sources(LIBRARY)
                   if re.search(r"np\.save|tarfile|TarWriter", p.read_text())})
    assert hits == ["sabiscale/shards/format.py"]


def test_one_sha256_helper():
    hits = sorted({str(p.relative_to(ROOT)) for p in _sources(LIBRARY) if "hashlib.file_digest" in p.read_text()
                   or re.search(r"hashlib\.sha256\([^)]*read_bytes", p.read_text())})
    assert hits == ["sabiscale/hashing.py"]


def test_the_library_names_no_development_paths():
    for path in _sources(LIBRARY):
        text = path.read_text()
        assert "../shared" not in text, path
        assert not re.search(r"\b(two|\d+)[- ](CPU[- ])?cores?\b", text, re.I), path


def test_no_private_sabiscale_imports_outside_the_library_and_tests():
    private = re.compile(r"from sabiscale[\w.]* import [^\n]*\b_[a-z]\w*|sabiscale\.[\w.]*\._[a-z]")
    for folder in (ROOT / "benchmarks", ROOT / "analysis"):
        for path in _sources(folder):
            assert not private.search(path.read_text()), path
            assert "sys.path" not in path.read_text(), path


def test_packaging_installs_no_plain_analysis_module_and_every_package():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = set(project["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in LIBRARY.rglob("__init__.py")}
    assert on_disk <= packages, on_disk - packages
    assert not any(p == "analysis" or p.startswith("analysis.") for p in packages)
    assert project["tool"]["setuptools"]["package-dir"] == {"sabiscale_analysis": "analysis"}
    # from a directory without the repository on the path, `analysis` is not importable but ours is
    probe = "import importlib.util as u; print(u.find_spec('analysis') is None, u.find_spec('sabiscale_analysis') is not None)"
    out = subprocess.run([sys.executable, "-c", probe], cwd="/", capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True"]


def test_the_library_never_imports_the_analysis_package():
    for path in _sources(LIBRARY):
        assert not re.search(r"^\s*(from|import) (sabiscale_)?analysis\b", path.read_text(), re.M), path


def test_a_new_loss_kind_is_one_class(demo_cfg, world, tmp_path):
    """A toy kind, defined only here: train on the prompt tokens alone (the opposite of masked)."""
    from sabiscale.config import load_config
    from sabiscale.loss.kinds import LOSS_KINDS, LossKind, register
    from sabiscale.train.hooks import StepRecorder
    from sabiscale.train.loop import train

    @register
    class PromptOnly(LossKind):
        name = "prompt_only"

        def candidates(self, input_ids, position_ids, loss_mask, pad_id):
            return ~loss_mask[:, 1:] & (position_ids[:, 1:] != 0) & (input_ids[:, 1:] != pad_id)

    try:
        cfg = demo_cfg.model_copy(deep=True)
        cfg.output_dir = fresh_run_dir(demo_cfg, tmp_path / "run")
        cfg.tracking.enabled = False
        cfg.train.max_steps, cfg.train.eval_batches, cfg.optim.warmup_steps = 3, 1, 1
        cfg.loss = load_config(None, ["loss.kind=prompt_only"]).loss
        steps = StepRecorder()
        result = train(cfg, world, [steps])
        first = steps.records[0].micro[0]
        prompt_targets = int((~first.loss_mask[:, 1:] & (first.position_ids[:, 1:] != 0)
                              & (first.task_ids[:, 1:] >= 0)).sum())
        assert steps.records[0].local_targets == prompt_targets > 0
        assert steps.records[0].sums.answer_tokens == 0  # it never trains an answer token
        assert all(torch.isfinite(torch.tensor(result.train_losses)))
    finally:
        LOSS_KINDS.pop("prompt_only", None)
    with pytest.raises(Exception, match="prompt_only"):
        load_config(None, ["loss.kind=prompt_only"])
