"""Loader stage: WebDataset shards -> batches for one rank."""
