"""Entry point: compose the config (Hydra), validate it, run one experiment, return its maj@1.

python main.py model=tiny task=arith init=sft algo=none
python main.py -m algo=none,ei init=sft,pretrained model=tiny task=arith   # a 2 x 2 multirun
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from reasoning_rl.config import register_configs
from reasoning_rl.launch.app import check_output_dirs, run_cli, run_job

PROJECT_ROOT = Path(__file__).resolve().parent

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    return run_job(cfg, PROJECT_ROOT)


if __name__ == "__main__":
    check_output_dirs(sys.argv)
    run_cli(main)
