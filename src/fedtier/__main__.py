import sys

from fedtier.cli import main

sys.exit(main())
