#!/usr/bin/env python
"""`python test.py EXPERIMENT.json [--set section.key=value ...]` = `cmpc test ...`."""

from cmpc.cli import script_main

if __name__ == "__main__":
    raise SystemExit(script_main(['test']))
