"""Stage 3, the loader: WebDataset shards -> batches for one rank (loader), the sample order
(order) and the batch layout (batch)."""
