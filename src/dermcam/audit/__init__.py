"""Shortcut audit: where a model's attention falls (border, vignette, ink, off the lesion) and what moves its answer."""
