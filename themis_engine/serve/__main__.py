"""`python -m themis_engine.serve MODEL --port 5000` (see themis_engine.serve)."""

import sys

from themis_engine.serve.app import main

if __name__ == "__main__":
    sys.exit(main())
