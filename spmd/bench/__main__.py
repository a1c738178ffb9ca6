import sys

from spmd.bench.cli import main

sys.exit(main())
