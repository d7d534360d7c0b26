import sys

from epoxi.cli import main

sys.exit(main())
