"""Stage 4a, the model: a transformers Llama built from the config (build), per-document attention
for packed batches (attention). Maps tokens to hidden states and logits, nothing else."""
