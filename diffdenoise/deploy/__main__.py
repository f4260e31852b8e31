"""``python -m diffdenoise.deploy -i DICOM_FOLDER -o OUTPUT_FOLDER -m MODEL``: see ``diffdenoise.deploy.app``."""

import sys

from diffdenoise.deploy.app import main

sys.exit(main())
