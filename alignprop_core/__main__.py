import sys

from alignprop_core.cli import main

sys.exit(main())
