"""``python -m worldkv_connector.cli``: the ``worldkv`` command where no console script is installed."""
import sys

from worldkv_connector.cli import main

sys.exit(main())
