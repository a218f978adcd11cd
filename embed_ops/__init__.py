"""Operator tools: the one-click launcher, start-up profiles, the weight downloader. Not shipped in Bentos."""
