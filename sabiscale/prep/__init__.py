"""Stage 1, raw text -> tokenizer -> documents: task templates (tasks), input adapters (sources),
the corpus reader (corpus), language/task mixing (mix), the generated demo corpus (demo_data), the
tokenizer and its report, and `sabiscale prepare` (prepare), which hands documents to shards/."""
