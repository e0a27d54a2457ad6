"""Benchmarks run against a live tpserve (or any OpenAI-compatible) server: ``tpserve bench serve``."""
