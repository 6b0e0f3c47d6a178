#!/usr/bin/env python
"""`python train_refine.py EXPERIMENT.json [--set section.key=value ...]` = `cmpc train refine ...`."""

from cmpc.cli import script_main

if __name__ == "__main__":
    raise SystemExit(script_main(['train', 'refine']))
