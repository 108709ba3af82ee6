"""Scoring kernels: index scores of queries against keys (tiles, one query at a time, the router's
pooled block keys) and the block visibility of a mask."""
