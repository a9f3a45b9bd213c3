"""Stage 1, raw text -> tokenizer -> documents: input adapters (sources), the corpus reader and
its held-out split (corpus), language/task mixing (mix), the generated demo corpus (demo_data), the
tokenizer and its report (tokenizer, tokenizer_report), contamination fingerprints (fingerprint),
near-duplicate removal (near_dup),
and `sabiscale prepare` (prepare, commands), which hands documents to shards/."""
