"""Thin entry points: parse a config, build Ray objects, call the greencode core."""
