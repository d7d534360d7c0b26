import sys

from services.node.main import main

sys.exit(main())
