"""`python -m themis_engine.eval MODEL --data FILE --output DIR` (see themis_engine.eval)."""

import sys

from themis_engine.eval.run import main

if __name__ == "__main__":
    sys.exit(main())
