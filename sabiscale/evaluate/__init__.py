"""Stage 7, a trained checkpoint put to use: held-out evaluation (heldout), reference scoring of
shards for the selective loss (score), export to a Hugging Face directory (export)."""
