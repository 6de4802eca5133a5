import sys

from worldkv_connector.cli import main

sys.exit(main())
