import sys

from funcnodes_tw.launcher import main

sys.exit(main())
