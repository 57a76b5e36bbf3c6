import sys

from instructrl.cli import main

sys.exit(main())
