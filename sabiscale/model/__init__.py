"""Stage 4, the model: a transformers Llama built from the config (build), per-document attention
for packed batches (attention), its fused layer (layer). Maps tokens to hidden states and logits."""
