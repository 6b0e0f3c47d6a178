#!/usr/bin/env python
"""`python train_emb.py EXPERIMENT.json [--set section.key=value ...]` = `cmpc train emb ...`."""

from cmpc.cli import script_main

if __name__ == "__main__":
    raise SystemExit(script_main(['train', 'emb']))
