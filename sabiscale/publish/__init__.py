"""Handing a trained model on: the Hugging Face model card and generation config written with
every export, and registration in the MLflow Model Registry."""
