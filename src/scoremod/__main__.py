import sys

from scoremod.cli import main

sys.exit(main())
