"""Stage 6, what a run records: MLflow tracking (tracking) through a journal (journal), the metrics
the loop computes (metrics, flops), probe losses for the trajectory analysis (probe), loss plots
(plots), and `tracking sync` (commands)."""
