"""The text of `sabiscale eval`'s report, and why a split found nothing."""
from __future__ import annotations

from pathlib import Path


def with_interval(scores: dict, name: str, digits: int = 3) -> str:
    value, interval = scores[name], scores.get(f"{name}_ci")
    text = f"{value:.{digits}f}"
    return text + (f" [{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]" if interval else "")


def format_report(report: dict) -> str:
    lines = contamination_lines(report)
    lines += ["", "teacher-forced (answer tokens; 95% bootstrap intervals over records)",
              f"{'task/lang':<24}{'n':>6}{'tokens':>8}  {'perplexity':<26}bits/byte"]
    for key, m in report["teacher_forced"].items():
        lines.append(f"{key:<24}{m['n']:>6}{m['answer_tokens']:>8}  {with_interval(m, 'perplexity', 2):<26}"
                     f"{with_interval(m, 'bits_per_byte')}")
    if report.get("classification"):
        lines += ["", "rank classification (the most likely label), beside always answering the slice's majority label"]
        for key, m in report["classification"].items():
            lines.append(f"{key:<24}n {m['n']}, accuracy {with_interval(m, 'rank_accuracy')}, macro-F1 "
                         f"{with_interval(m, 'rank_macro_f1')}; majority '{m['majority_label']}' accuracy "
                         f"{m['majority_accuracy']:.3f}, macro-F1 {m['majority_macro_f1']:.3f}"
                         + (f"\n{'':<24}caveat: {m['caveat']}" if m.get("caveat") else ""))
    if report.get("generation"):
        lines += ["", "generated (greedy decoding)"]
    for key, m in report["generation"].items():
        names = [k for k, v in m.items() if isinstance(v, float) and not k.endswith("_ci")]
        scores = ", ".join(f"{k} {with_interval(m, k)}" for k in names)
        extra = f", unparsed {m['unparsed']}" if "unparsed" in m else ""
        lines.append(f"{key:<24}n {m['examples']}, {scores}{extra}")
    return "\n".join(lines)


def contamination_lines(report: dict) -> list[str]:
    counts = report.get("contamination", {})
    if not counts:
        return []
    total = {k: sum(c[k] for c in counts.values()) for k in ("records", "exact", "ngram", "clean")}
    scored = "every record (--include-contaminated)" if report.get("include_contaminated") else "the clean records only"
    lines = [f"contamination against the training shards: {total['records']} records, {total['exact']} in training "
             f"exactly, {total['ngram']} by 13-gram overlap; scores below are on {scored}"]
    lines += [f"  {key:<22}{c['records']:>6} records, {c['exact']} exact, {c['ngram']} 13-gram, {c['clean']} clean"
              for key, c in counts.items() if c["exact"] or c["ngram"]]
    return lines


def no_examples_message(split: str, root: Path | None, counts: dict[str, int]) -> str:
    """Which --split values would find examples in this data, and why this one found none."""
    why = {"dev": "no record is held out (field `orig_split` in data.heldout_splits, or the hash slice "
                  "data.heldout_fraction of records without it)",
           "val": "no record falls into the run's validation hash split", "all": "it holds no records of the run's tasks"}
    working = [f"--split {name} ({n} examples)" for name, n in counts.items() if n and name != split]
    return (f"no {split} examples under {root or 'data.files'}: {why[split]}. "
            + (f"These would work: {', '.join(working)}." if working else "No --split finds examples there."))
