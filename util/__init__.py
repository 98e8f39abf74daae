"""Utilities shared by models, data sets and the training engine."""
