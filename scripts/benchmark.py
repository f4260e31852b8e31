"""Run the benchmark from a clone: datasets x noises x methods of a preset, resumable (see docs/benchmark.md).

Usage: python scripts/benchmark.py --preset smoke --data ../shared/data --out runs/bench
       [--dataset studyforrest --noise gaussian,poisson_corr1.2 --method noisy,bm3d,bsn --reference full,down2]
"""

import fire

from diffdenoise.benchmark import main

if __name__ == "__main__":
    fire.Fire(main)
