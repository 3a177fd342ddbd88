"""Structured output with xgrammar: grammar compilation off the busy loop, its cache and matchers."""
