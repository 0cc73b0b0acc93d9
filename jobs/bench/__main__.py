import sys

from jobs.bench.main import main

sys.exit(main())
