"""Model factory: the guide's seed CNN and any timm architecture."""
