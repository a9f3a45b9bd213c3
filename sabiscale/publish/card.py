"""The model card (`README.md` in the Hub's format) and `generation_config.json` of an export.

Everything in the card comes from what the run recorded: the recipe in the checkpoint's sidecar,
the manifest of its shards (sources, tokens per task and language), the eval reports `sabiscale
eval` left in the checkpoint, and the task templates (with an example rendered by the code that
wrote the shards, so the prompts shown are the ones the model was trained on).
"""
from __future__ import annotations

import json
from pathlib import Path

from sabiscale.config import RunConfig
from sabiscale.tasks import EXAMPLE_RECORDS, render, task_guide, task_registry

# ISO 639-1 where a language has one (the Hub's `language` field), else the 639-3 code
ISO_639_1 = {"yor": "yo", "hau": "ha", "ibo": "ig", "eng": "en", "pcm": "pcm", "fra": "fr", "swa": "sw"}


def card_languages(manifest: dict, cfg: RunConfig) -> list[str]:
    langs = {key.split("/")[1] for key in manifest["splits"]["train"]["counts"]["by_task_lang"]} or set(cfg.data.languages)
    langs |= {part for key in langs for part in key.split("-")}  # translation pairs eng-yor
    return sorted({ISO_639_1.get(lang, lang) for lang in langs if "-" not in lang})


def example_prompts(cfg: RunConfig) -> list[dict[str, str]]:
    """One working prompt per task the model was trained on (the Hub shows them as widgets)."""
    registry = task_registry(cfg.data.task_defs)
    out = []
    for task in cfg.data.tasks:
        record = EXAMPLE_RECORDS.get(task)
        if record is not None and task in registry:
            example = render(task, registry[task], record, "example", [], 0)
            out.append({"text": example.prompt, "example_title": task})
    return out


def header(cfg: RunConfig, manifest: dict) -> dict:
    return {"language": card_languages(manifest, cfg), "library_name": "transformers", "pipeline_tag": "text-generation",
            "tags": ["sabiscale", "llama", "multilingual", "low-resource", f"loss-{cfg.loss.kind}", *cfg.data.tasks],
            "datasets": sorted({s["path"] for s in manifest.get("sources", [])}),
            "widget": example_prompts(cfg)}


def data_table(manifest: dict) -> list[str]:
    counts = manifest["splits"]["train"]["counts"]["by_task_lang"]
    lines = ["| task/language | documents | tokens | supervised (answer) tokens |", "|---|---:|---:|---:|"]
    for key, c in sorted(counts.items()):
        lines.append(f"| {key} | {c['documents']} | {c['tokens']} | {c.get('supervised_tokens', '-')} |")
    return lines


def eval_tables(tag_dir: Path) -> list[str]:
    """The scores of every `sabiscale eval` report kept in the checkpoint."""
    lines = []
    for report_path in sorted(tag_dir.glob("eval_*.json")):
        report = json.loads(report_path.read_text(encoding="utf-8"))
        lines += ["", f"Split `{report['split']}` of `{report['data']}` (step {report['step']}, "
                  f"{report['examples_per_file'] or 'all'} records per file):", "",
                  "| task/language | records | perplexity | bits/byte (95% interval) |", "|---|---:|---:|---:|"]
        lines += [f"| {k} | {v.get('n', '')} | {v['perplexity']:.2f} | {v['bits_per_byte']:.3f}"
                  + (" [{:.3f}, {:.3f}]".format(*v["bits_per_byte_ci"]) if "bits_per_byte_ci" in v else "") + " |"
                  for k, v in report["teacher_forced"].items()]
        if report["generation"]:
            lines += ["", "| generated (greedy) | examples | scores |", "|---|---:|---|"]
            for k, v in report["generation"].items():
                scores = ", ".join(f"{n} {x:.3f}" for n, x in v.items()
                                   if isinstance(x, float) and n not in ("examples", "unparsed"))
                lines.append(f"| {k} | {v['examples']} | {scores} |")
    return lines or ["", "Not evaluated yet: `sabiscale eval CHECKPOINT` writes a report into the checkpoint, and a "
                         "later export shows it here."]


def model_card(cfg: RunConfig, manifest: dict, meta: dict, tag_dir: Path, parameters: int) -> str:
    import yaml

    train = manifest["splits"]["train"]["counts"]
    seen = meta["step"] * cfg.train.micro_batch_size * cfg.train.grad_accum_steps * meta.get("world_size", 1)
    lines = ["---", yaml.safe_dump(header(cfg, manifest), allow_unicode=True, sort_keys=False).strip(), "---", "",
             f"# {cfg.name}", "",
             f"A {parameters / 1e6:.1f}M-parameter Llama-architecture language model for "
             f"{', '.join(card_languages(manifest, cfg))}, pre-trained with sabiscale on SabiYarn-style multi-task data: "
             "every task is written with XML-like tags, and the prompt ends where the answer begins.", "",
             "## How to prompt it", "",
             "Give the prompt exactly as below (the tags are single tokens of the tokenizer) and let the model "
             "continue; it ends its answer with `<|endoftext|>`.", "", task_guide(cfg.data.tasks, task_registry(cfg.data.task_defs)), "",
             "```python", "from transformers import pipeline", "",
             "generate = pipeline(\"text-generation\", model=\"PATH_TO_THIS_DIRECTORY\")",
             f"print(generate({(example_prompts(cfg) or [{'text': ''}])[0]['text']!r}, max_new_tokens=32)[0][\"generated_text\"])",
             "```", "", "## Training data", "",
             f"{train['sequences']} packed sequences of {manifest['seq_len']} tokens ({train['tokens']} tokens, "
             f"{train['supervised_tokens']} of them supervised) from these sources: "
             + ", ".join(f"`{s['path']}`" for s in manifest.get("sources", [])) + ".", "", *data_table(manifest), "",
             "## Training", "",
             f"- model: {cfg.model.num_layers} layers, hidden {cfg.model.hidden_size}, {cfg.model.num_heads} heads, "
             f"context {manifest['seq_len']}, {parameters / 1e6:.2f}M parameters",
             f"- steps: {meta['step']} (about {seen} sequences, {seen * manifest['seq_len']} tokens)",
             f"- loss: `{cfg.loss.kind}`" + (" (answer tokens only; prompt tokens are context)" if cfg.loss.kind == "masked" else ""),
             f"- optimizer: {cfg.optim.kind}, lr {cfg.optim.lr}; DeepSpeed profile `{Path(cfg.engine.ds_config).name}`",
             f"- tokenizer sha256 `{meta.get('tokenizer_sha256', '?')[:16]}...`, MLflow run `{meta.get('mlflow_run_id')}`",
             "", "## Evaluation", *eval_tables(tag_dir), "", "## Limitations", "",
             "- A small model trained on little data: expect fluent-looking but often wrong output; check its scores "
             "above before relying on it for any task or language.",
             "- It knows only the tasks and languages listed; prompts in other formats are out of distribution.",
             "- The data is news, tweets and translations: its topics, dialects and biases carry over."]
    return "\n".join(lines) + "\n"


def write_publishing_files(out_dir: Path, lm, tok, cfg: RunConfig, meta: dict, tag_dir: Path) -> None:
    """generation_config.json and the model card (README.md) of an export directory."""
    from transformers import GenerationConfig

    manifest_path = cfg.shards_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8")) if manifest_path.is_file() else {
        "seq_len": cfg.data.seq_len, "sources": [], "splits": {"train": {"counts": {
            "sequences": "?", "tokens": "?", "supervised_tokens": "?", "by_task_lang": {}}}}}

    GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, max_length=manifest["seq_len"],
                     do_sample=False).save_pretrained(str(out_dir))
    parameters = sum(p.numel() for p in lm.parameters())
    (out_dir / "README.md").write_text(model_card(cfg, manifest, meta, tag_dir, parameters), encoding="utf-8")
