"""Subcommands of `fhir-massage`: each module here defines ``ORDER`` (its place in --help), ``register(subparsers)``.

A module's ``register`` adds one subparser and sets ``func`` on it; ``func(args) -> int`` is the exit code.
"""
