"""`sabiscale eval EXPORT_DIR --harness --data ROOT`: lm-evaluation-harness on an exported model,
with task configs in sabiscale's own tag format that read local JSONL laid out like
a task layout directory (<root>/<task>/<file>.jsonl; the official dev records of each file).

The configs are written per file into `<out>/tasks/` (lm-eval reads task YAMLs from a directory,
`--include_path`): `sabiscale_<task>_<file stem>` for translation (chrF, BLEU), ner (entity F1),
sentiment (accuracy, macro-F1) and text (bits per byte of the answer, end-of-text included, as
`sabiscale eval` counts it). Prompts are rendered and outputs scored by sabiscale's own code
(`harness_utils.py`), so for the same records and outputs both report the same numbers; the
generation budget of each file is the one `sabiscale eval` uses (longest reference + 8 tokens).
The same directory runs with the `lm_eval` command line:
    lm_eval --model hf --model_args pretrained=EXPORT_DIR --include_path OUT/tasks --tasks sabiscale_ner_yor
"""
from __future__ import annotations

import json
from pathlib import Path

from sabiscale.errors import MissingInput, UserError

TASKS = {  # task folder -> (docs function, results function, metrics, output type)
    "translation": ("translation_docs", "translation_results", ("chrf", "bleu"), "generate_until"),
    "ner": ("ner_docs", "ner_results", ("entity_f1",), "generate_until"),
    "sentiment": ("sentiment_docs", "sentiment_results", ("accuracy", "macro_f1"), "generate_until"),
    "text": ("text_docs", "text_results", ("bits_per_byte",), "loglikelihood"),
}


def task_yaml(name: str, path: Path, task: str, max_gen_toks: int) -> str:
    docs, results, metrics, output_type = TASKS[task]
    lines = [f"task: {name}", "dataset_path: json", "dataset_kwargs:", "  data_files:", f"    dev: {json.dumps(str(path))}",
             "test_split: dev", f"output_type: {output_type}", f"process_docs: !function utils.{docs}",
             "doc_to_text: prompt", "doc_to_target: target" if output_type == "loglikelihood" else "doc_to_target: answer",
             f"process_results: !function utils.{results}", "metric_list:"]
    for metric in metrics:
        lines += [f"  - metric: {metric}", f"    aggregation: !function utils.{metric}",
                  f"    higher_is_better: {'false' if metric == 'bits_per_byte' else 'true'}"]
    if output_type == "generate_until":
        lines += ["generation_kwargs:", '  until: ["<|endoftext|>"]', "  do_sample: false", f"  max_gen_toks: {max_gen_toks}"]
    return "\n".join(lines + ["metadata:", "  version: 1.0"]) + "\n"


def dev_sample(task: str, path: Path, limit: int | None) -> list[dict]:
    """The dev records of `path` that render as `task` examples, `limit` of them spread evenly over
    the file: the records `sabiscale eval --max-per-file` takes, so both evaluate the same ones."""
    from sabiscale.prep.corpus import evenly_spaced, is_dev_record
    from sabiscale.prep.tasks import BUILTIN_TASKS, NotApplicable, render

    usable = []
    with path.open(encoding="utf-8") as f:
        for record in (json.loads(line) for line in f if line.strip()):
            if not is_dev_record(record):
                continue
            try:
                render(task, BUILTIN_TASKS[task], dict(record), "harness", [], 0)
            except NotApplicable:
                continue
            usable.append(record)
    return evenly_spaced(usable, limit)


def generation_budget(tok, records: list[dict], task: str) -> int:
    """Longest reference answer (tokens) of the records lm-eval will read, + 8: `sabiscale eval`'s rule."""
    from sabiscale.prep.tasks import BUILTIN_TASKS, render

    longest = 1
    for count, record in enumerate(records):
        answer = render(task, BUILTIN_TASKS[task], dict(record), f"harness:{count}", [], 0).answer.strip()
        longest = max(longest, len(tok.encode(answer, add_special_tokens=False)))
    return longest + 8


def write_task_configs(tok, data_root: Path, out: Path, limit: int | None, context: int) -> list[str]:
    """One task config per file; with `limit`, over a file of the sampled dev records in `out/data/`
    (lm-eval's own limit would take each file's head)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "utils.py").write_text("from sabiscale.evaluate.harness_utils import *  # noqa: F401,F403\n")
    names = []
    for task in TASKS:
        for path in sorted((data_root / task).glob("*.jsonl")):
            name = f"sabiscale_{task}_{path.stem}"
            records = dev_sample(task, path, limit)
            source = path.resolve()
            if limit is not None:
                source = out / "data" / f"{name}.jsonl"
                source.parent.mkdir(exist_ok=True)
                source.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
            # lm-eval refuses a budget that does not leave room in the model's context for the prompt
            budget = min(generation_budget(tok, records, task), context // 2) if TASKS[task][3] == "generate_until" else 0
            (out / f"{name}.yaml").write_text(task_yaml(name, source.resolve(), task, budget), encoding="utf-8")
            names.append(name)
    if not names:
        raise MissingInput(f"{data_root} holds no <task>/<file>.jsonl for {', '.join(TASKS)} (the task layout: <root>/translation/eng-yor.jsonl, <root>/ner/yor.jsonl, ...)")
    return names


def run_harness(export_dir: Path, data_root: Path, out: Path, limit: int | None, device: str) -> dict:
    """lm-eval on the export, every task config above; returns {task name: {metric: value}}."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError("--harness needs lm-evaluation-harness: pip install 'sabiscale[eval]'") from None
    from transformers import AutoTokenizer

    if not (export_dir / "config.json").is_file():
        raise MissingInput(f"{export_dir} is not an exported model directory: `sabiscale export CHECKPOINT DIR` first")
    names = write_task_configs(AutoTokenizer.from_pretrained(str(export_dir)), data_root, out / "tasks", limit,
                               json.loads((export_dir / "config.json").read_text())["max_position_embeddings"])
    results = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={export_dir},dtype=float32", tasks=names,
                                      task_manager=TaskManager(include_path=str(out / "tasks")), limit=None,
                                      batch_size=1, device=device, log_samples=False)
    scores = {name: {k.split(",")[0]: v for k, v in values.items() if k.endswith(",none")}
              for name, values in results["results"].items()}
    (out / "harness.json").write_text(json.dumps({"export": str(export_dir), "data": str(data_root), "limit": limit,
                                                  "scores": scores}, indent=2) + "\n")
    return scores
