"""`python -m komt_edge.cli`: the same as the `komt-edge` command (used by `accelerate launch -m`)."""

from . import main

main()
