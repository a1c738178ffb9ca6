import sys

from spmd.bench.collectives import main

sys.exit(main())
