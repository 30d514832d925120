"""Adapters at Kairos's edges: feeds in (decode, map, validate) and instructions out.

Data flows one way: feeds -> `adapters` (ingest) -> `engine` (rules, state,
policy) -> instructions -> `adapters` (outputs and channels) -> feedback.
"""
