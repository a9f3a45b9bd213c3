"""Stage 3, the loader: WebDataset shards -> batches for one rank (loader), the sample order
(order), the mix drawn by a schedule of phases (schedule) and the batch layout (batch)."""
