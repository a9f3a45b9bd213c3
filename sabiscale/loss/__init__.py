"""Stage 5, the loss: objectives that wrap the causal LM (objective), one class per loss kind
(kinds), the supervised head run only where targets are (head)."""
