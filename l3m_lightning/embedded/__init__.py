"""Embedded, offline-generated default data for l3m-lightning."""
