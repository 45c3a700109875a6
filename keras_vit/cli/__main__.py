"""`python -m keras_vit.cli COMMAND ...`: the same as `keras-vit COMMAND ...`."""

import sys

from keras_vit.cli import main

sys.exit(main())
