"""Stage 2, shards: tokenized documents -> packed fixed-length sequences (pack) -> WebDataset .tar
+ manifest (format, write), checked against the manifest (verify); `shards` commands (commands)."""
