"""Datasets in rcllm's formats: items, interactions, and ranking requests drawn from them."""
