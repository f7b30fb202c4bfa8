import sys

from flint.cli import main

sys.exit(main())
