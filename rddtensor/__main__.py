import sys

from rddtensor.cli import main

sys.exit(main())
