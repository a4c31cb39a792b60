"""`python -m steper_dspy.cli`: the `steper` command line (for `accelerate launch -m steper_dspy.cli train ...`)."""

from steper_dspy.cli import main

main()
