"""Stage 5, training: the DeepSpeed engine (engine, the only module that imports deepspeed), the one
training loop (loop) and its step (step), resume checks (resume), checkpoints (checkpoint), the
seam for test and benchmark instruments (hooks), and the memory planner (plan)."""
