import sys

from megamt.cli import main

sys.exit(main())
