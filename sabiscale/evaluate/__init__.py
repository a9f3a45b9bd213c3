"""Stage 8, a trained checkpoint put to use: held-out evaluation (heldout) with bootstrap intervals
(uncertainty), its report (report), lm-evaluation-harness tasks (harness, harness_utils), reference
scoring of shards for the selective loss (score), and the `eval`, `score`, `generate` commands
(commands)."""
