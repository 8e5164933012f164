"""Tools behind ``segue`` subcommands that measure a model: ``segue sweep``, ``segue calibrate-cache``."""
