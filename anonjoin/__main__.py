import sys

from anonjoin._cli import main

sys.exit(main())
