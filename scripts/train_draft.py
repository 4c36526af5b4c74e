"""Distil the draft model of a target: `jaxspec train-draft` as a script.

    python scripts/train_draft.py [--model NAME|DIR] [--out DIR] [--steps N] ...

See `jaxspec.distill` for the pipeline and `jaxspec train-draft --help` for every option.
"""

import sys

from jaxspec.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-draft", *sys.argv[1:]]))
