"""Loading interactions and item text from disk."""
