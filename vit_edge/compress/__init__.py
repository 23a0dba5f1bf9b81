"""Model compression: structured pruning that removes units (groups, importance, prune).

See vit_edge/compress/prune.py for the command and README "Compression".
"""
