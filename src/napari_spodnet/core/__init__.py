"""Pure numerics: torch, numpy and scipy only (never Qt or napari)."""
