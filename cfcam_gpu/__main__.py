"""``python -m cfcam_gpu ...``: the same command line as ``cfcam ...``."""
import sys

from .app import main

if __name__ == "__main__":
    sys.exit(main())
