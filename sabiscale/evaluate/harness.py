"""`sabiscale eval EXPORT_DIR --harness --data ROOT`: lm-evaluation-harness on an exported model,
with task configs in sabiscale's own tag format that read local JSONL laid out like
a task layout directory (<root>/<task>/<file>.jsonl; the records the run held out, by the split
rule the export carries in sabiscale.json, less those that appear in its training data by the
fingerprints the export carries, unless contaminated ones are asked for).

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


def dev_sample(task: str, path: Path, limit: int | None, rule, fingerprints, counts: dict) -> list[dict]:
    """The held-out records of `path` that render as `task` examples and, with `fingerprints`,
    do not appear in training; `limit` of them spread evenly over the file: the records `sabiscale
    eval --max-per-file` takes, so both evaluate the same ones. `counts` gets the contamination."""
    from sabiscale.prep.corpus import evenly_spaced
    from sabiscale.tasks import BUILTIN_TASKS, NotApplicable, render

    usable = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            record, where = json.loads(line), f"{path}:{line_no}"
            if rule.split(record, where) != "heldout":
                continue
            try:
                example = render(task, BUILTIN_TASKS[task], dict(record), where, [], 0)
            except NotApplicable:
                continue
            usable.append((record, example))
    kept = []
    for record, example in evenly_spaced(usable, limit):  # sampled first, then checked: as `sabiscale eval` does
        found = fingerprints.overlap(example, BUILTIN_TASKS[task]) if fingerprints is not None else None
        counts[found or "clean"] = counts.get(found or "clean", 0) + 1
        if found is None:
            kept.append(record)
    return kept


def export_facts(export_dir: Path):
    """(split rule, training fingerprints or None) the export carries; older exports: the default rule."""
    from sabiscale.config import DataConfig
    from sabiscale.prep.corpus import SplitRule
    from sabiscale.prep.fingerprint import FINGERPRINTS, Fingerprints

    facts_path = export_dir / "sabiscale.json"
    recorded = json.loads(facts_path.read_text()).get("split_rule") if facts_path.is_file() else None
    rule = (SplitRule(tuple(recorded["heldout_splits"]), recorded["val_fraction"], recorded["heldout_fraction"])
            if recorded else SplitRule.of(DataConfig()))
    fingerprints = Fingerprints.load(export_dir) if (export_dir / FINGERPRINTS).is_file() else None
    return rule, fingerprints


def generation_budget(tok, records: list[dict], task: str) -> int:
    """Longest reference answer (tokens) of the records lm-eval will read, + 8: `sabiscale eval`'s rule."""
    from sabiscale.tasks import BUILTIN_TASKS, render

    longest = 1
    for count, record in enumerate(records):
        answer = render(task, BUILTIN_TASKS[task], dict(record), f"harness:{count}", [], 0).answer.strip()
        longest = max(longest, len(tok.encode(answer, add_special_tokens=False)))
    return longest + 8


def write_task_configs(tok, data_root: Path, out: Path, limit: int | None, context: int, rule, fingerprints,
                       contamination: dict) -> list[str]:
    """One task config per file, over a file of its held-out (and clean) records in `out/data/`
    (lm-eval's own limit would take each file's head)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "utils.py").write_text("from sabiscale.evaluate.harness_utils import *  # noqa: F401,F403\n")
    names = []
    for task in TASKS:
        for path in sorted((data_root / task).glob("*.jsonl")):
            name = f"sabiscale_{task}_{path.stem}"
            records = dev_sample(task, path, limit, rule, fingerprints, contamination.setdefault(name, {}))
            if not records:
                continue
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


def run_harness(export_dir: Path, data_root: Path, out: Path, limit: int | None, device: str,
                include_contaminated: bool = False) -> dict:
    """lm-eval on the export, every task config above; returns {task name: {metric: value}}."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError("--harness needs lm-evaluation-harness: pip install 'sabiscale[eval]'") from None
    from transformers import AutoTokenizer

    if not (export_dir / "config.json").is_file():
        raise MissingInput(f"{export_dir} is not an exported model directory: `sabiscale export CHECKPOINT DIR` first")
    rule, fingerprints = export_facts(export_dir)
    fingerprints = None if include_contaminated else fingerprints
    contamination: dict[str, dict] = {}
    names = write_task_configs(AutoTokenizer.from_pretrained(str(export_dir)), data_root, out / "tasks", limit,
                               json.loads((export_dir / "config.json").read_text())["max_position_embeddings"],
                               rule, fingerprints, contamination)
    results = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={export_dir},dtype=float32", tasks=names,
                                      task_manager=TaskManager(include_path=str(out / "tasks")), limit=None,
                                      batch_size=1, device=device, log_samples=False)
    scores = {name: {k.split(",")[0]: v for k, v in values.items() if k.endswith(",none")}
              for name, values in results["results"].items()}
    (out / "harness.json").write_text(json.dumps({"export": str(export_dir), "data": str(data_root), "limit": limit,
                                                  "contamination": contamination,
                                                  "fingerprints": fingerprints is not None, "scores": scores},
                                                 indent=2) + "\n")
    return scores
