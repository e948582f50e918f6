"""Readers and writers: streaming input validation, atomic exports."""
