"""`python -m tunesmith` (what torchrun runs: `torchrun --nproc_per_node 2 -m tunesmith train
run.yaml`)."""

from tunesmith.cli import main

main()
