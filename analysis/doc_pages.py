"""The pages under docs/results/, each written whole by one command from the output of sabiscale's
own commands (nothing added by hand):

    .venv/bin/python -m sabiscale_analysis.doc_pages plan        # docs/results/plan.md
    .venv/bin/python -m sabiscale_analysis.doc_pages tokenizer   # docs/results/tokenizer.md (prepares shared_data once)
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from sabiscale_analysis.experiment import RECIPE, ROOT, rendered_line

DOCS = ROOT / "docs" / "results"
SABISCALE = str(Path(sys.executable).parent / "sabiscale")


def output_of(*argv: str) -> str:
    return subprocess.run([SABISCALE, *argv], cwd=ROOT, check=True, capture_output=True, text=True).stdout.rstrip()


def plan_page() -> list[str]:
    argv = ["plan", str(RECIPE.relative_to(ROOT)), "--gpu-memory", "24GiB", "--largest"]
    return ["# sabiscale plan: the standard recipe on one 24 GiB GPU", "",
            f"Command: `sabiscale {' '.join(argv)}`  ", rendered_line(["plan"]), "",
            "GPU figures assume bf16 compute; the planner's terms and their check against DeepSpeed's estimators "
            "and measured RSS: sabiscale/train/plan.py, tests/test_plan.py, benchmarks/results/memory_plan.md. The "
            "largest-model list holds the recipe's micro-batch and uses activation checkpointing; it checks only "
            "GPU memory, with the host memory each needs shown beside it.", "", "```", output_of(*argv), "```"]


def tokenizer_page() -> list[str]:
    recipe = str(RECIPE.relative_to(ROOT))
    subprocess.run([SABISCALE, "prepare", recipe], cwd=ROOT, check=True, capture_output=True)  # a no-op once prepared
    return ["# Tokenizer report on ../shared/data", "",
            f"Command: `sabiscale tokenizer report {recipe}` (after `sabiscale prepare {recipe}`)  ",
            rendered_line(["tokenizer"]), "",
            "The recipe's byte-level BPE, trained by `sabiscale prepare` on the training split of every task and "
            "language, measured on the texts of every task. Fertility is tokens per whitespace word; bytes/token "
            "counts UTF-8 bytes; the byte-fallback share is the share of tokens that are a lone byte of a "
            "multi-byte character (a byte-level BPE has no unknown token, so this is its unknown rate).", "",
            "```", output_of("tokenizer", "report", recipe), "```"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("page", choices=["plan", "tokenizer"])
    args = parser.parse_args()
    lines = {"plan": plan_page, "tokenizer": tokenizer_page}[args.page]()
    (DOCS / f"{args.page}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
