"""sabiscale: multilingual multi-task pre-training for low-resource languages.

Stages, one module each: tasks/corpus (raw data) -> tokenizer -> shards -> data (loader) ->
model + loss -> engine (DeepSpeed) -> checkpoint + tracking (MLflow). See README.md.
"""
__version__ = "0.1.0"
