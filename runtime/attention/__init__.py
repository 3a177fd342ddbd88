"""fornax package."""
