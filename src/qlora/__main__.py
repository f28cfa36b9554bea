"""`python -m qlora`: the CLI, as torchrun and `accelerate launch -m qlora` start it."""

from qlora.cli import main

main()
