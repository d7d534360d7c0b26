import sys

from services.monitor.main import main

sys.exit(main())
