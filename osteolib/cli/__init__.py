"""Layer 8, the command line: profiles, the ``osteo`` runner, the torchrun stage entry. Nothing imports this package."""
