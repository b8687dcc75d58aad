"""`python3 -m vmm.oci ...` is `vmm-runtime ...` (where the console script is not on PATH)."""

import sys

from vmm.oci.entry import main

sys.exit(main())
