"""Placeholder: process-wide runtime setup that must run before jax is imported."""
