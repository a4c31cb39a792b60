"""The `steper` command line."""


def main() -> None:
    """Run the `steper` command line."""
    from steper_dspy.cli.app import main as run

    run()
