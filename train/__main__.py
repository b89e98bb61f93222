"""`python -m train <verb>`: the same as the `pfc` console script (train/cli/)."""

from .cli import main

# The guard matters: worker processes started with the "spawn" method (`pfc ablate --jobs N`)
# import the parent's main module under another name, and must not run the CLI again.
if __name__ == "__main__":
    raise SystemExit(main())
