"""`python -m medsec <verb> ...` is the same as the `medsec` console script."""
from medsec.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
