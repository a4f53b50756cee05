"""Experiments of blaq_jax: data, models, losses and the training application."""
