"""Training: the library behind `olmo-fast train` (loop.py) and `olmo-fast prepare-data` (prepare_data.py); their
command lines are in `olmo_fast/cli/`.

config.py (TrainConfig, YAML + overrides) -> data.py (token files, order) / optim.py (AdamW groups) /
schedule.py (LR, grad-clip warm-up) / dist.py (torchrun, FSDP2) / state.py (checkpoints) -> loop.py (Trainer).
In Python: `Trainer(load_config(["--max_duration=10"])).fit()` (from `.config` and `.loop`).
"""
