import sys

from zerofs_csi.cli import main

sys.exit(main())
