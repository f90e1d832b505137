"""Benchmarks: commands that print ratios measured side by side in one run (A/B interleaved, medians)."""


def command(main, argv=None) -> None:
    """Run a benchmark's `main` as a command: a failure the user can fix (MirrorDeployError) ends it with
    the problem and its fix on stderr and exit status 1, not a traceback."""
    from ..errors import MirrorDeployError
    try:
        main() if argv is None else main(argv)
    except MirrorDeployError as error:
        raise SystemExit(f"error: {error}")
