#!/usr/bin/env python3
"""spark-submit entry point of `spark-gmm select`: `spark-submit jobs/select_gmm.py --help` lists the flags.

The job itself is `spark_gmm.cli`, so spark_gmm must be importable on the driver: installed, or
shipped with `--py-files spark_gmm.zip` (see docs/jobs.md).
"""

import sys

from spark_gmm.cli import main

if __name__ == "__main__":
    sys.exit(main(["select", *sys.argv[1:]]))
