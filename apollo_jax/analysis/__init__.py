"""Routing analysis: expert choices counted per language and family, specialization, plots."""
