"""Grid files of the shipped ablations; ``python -m ablations GRID`` runs one like ``infocnf ablate``."""
