"""``safa`` subcommands: every module here exposes ``add_parser(subparsers) -> argparse.ArgumentParser``.

``add_parser`` adds its subparser and sets ``func`` (``(args) -> int`` exit code) with
``parser.set_defaults(func=...)``. :func:`safa.cli.main` discovers the modules itself, so a
new subcommand is one new file here. Raise :class:`safa.errors.CLIError` (or ``ValueError``)
for a one-line user error (exit code 2).
"""
