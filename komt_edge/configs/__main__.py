"""`python -m komt_edge.configs [NAME]`: print the path of the shipped configs (all, or one by short name)."""

import sys

from . import CONFIGS, config_path

if len(sys.argv) > 1:
    try:
        print(config_path(sys.argv[1]))
    except KeyError as err:
        print(f"error: {err.args[0]}", file=sys.stderr)
        sys.exit(1)
else:
    for short in CONFIGS:
        print(f"{short:18s} {config_path(short)}")
