"""Datasets (digits, image folders, text) and the metrics computed on them."""
