"""SFT, then RM, then PPO in one launch: ``python run_stages.py CONFIG KEY=VALUE...``.

The parity test starts this under ``accelerate launch`` so that the three stages cost one
process-group start-up; it calls the same ``run_*`` functions as ``instructrl sft|rm|ppo``.
"""

import sys

from instructrl.config import load_config
from instructrl.stages.ppo import run_ppo
from instructrl.stages.rm import run_rm
from instructrl.stages.sft import run_sft

if __name__ == "__main__":
    config = load_config(sys.argv[1], sys.argv[2:])
    for run in (run_sft, run_rm, run_ppo):
        run(config, log=lambda *_: None)
