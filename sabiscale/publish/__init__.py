"""Stage 9, handing a trained model on: export to a Hugging Face directory (export), the model card
and generation config written with it (card), registration in the MLflow Model Registry
(registry), and the `export` command (commands)."""
