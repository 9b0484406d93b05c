"""Entrypoints (train, evaluate, export) and launch scripts."""
