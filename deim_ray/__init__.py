"""deim_ray: DEIM-family detector training on Ray Train with a two-stage, resumable run and one resolved artifact."""

__version__ = "0.1.0"
