"""Stage 7, training: the DeepSpeed engine (engine, the only module that imports deepspeed), the run
it trains (run), the one training loop (loop) and its step (step), resume checks (resume),
checkpoints (checkpoint), the Rho-1 reference model (reference), the device checks (device), the
inputs check (inputs), preemption (preemption), the seam for test and benchmark instruments
(hooks), exports while training (exports), the profiler window, step watchdog and out-of-memory
report (diagnostics), the memory planner (plan) and its check at N ranks (rank_memory), and the `train`, `demo`, `plan` commands (commands)."""
