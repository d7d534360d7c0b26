import sys

from services.ingress.main import main

sys.exit(main())
