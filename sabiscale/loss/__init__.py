"""Loss stage: objectives that wrap the causal LM and return (sum of token losses, token count)."""
