"""``diffdenoise benchmark`` for a clone without the console script (same arguments; see docs/benchmark.md).

Usage: python scripts/benchmark.py --preset smoke --data ../shared/data --out runs/bench
       [--dataset studyforrest --noise gaussian,poisson_corr1.2 --method noisy,bm3d,srds --reference full,down2]
"""

import sys

from diffdenoise.cli import main

if __name__ == "__main__":
    sys.exit(main(["benchmark", *sys.argv[1:]]))
