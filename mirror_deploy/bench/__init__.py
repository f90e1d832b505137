"""Benchmarks: commands that print ratios measured side by side in one run (A/B interleaved, medians)."""


def command(main) -> None:
    """Run a benchmark's `main` as a command: a failure the user can fix (MirrorDeployError) ends it with
    the problem and its fix on stderr and exit status 1, not a traceback."""
    from ..errors import MirrorDeployError
    try:
        main()
    except MirrorDeployError as error:
        raise SystemExit(f"error: {error}")
