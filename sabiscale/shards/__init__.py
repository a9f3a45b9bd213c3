"""Shards stage: tokenized documents -> packed fixed-length sequences -> WebDataset .tar + manifest."""
