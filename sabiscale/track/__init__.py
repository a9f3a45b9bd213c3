"""Stage 6, what a run records: MLflow tracking (tracking), the metrics the loop computes (metrics,
flops), probe losses for the trajectory analysis (probe) and loss plots (plots)."""
