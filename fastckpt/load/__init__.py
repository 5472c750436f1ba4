"""Executing a plan: the copy engine's jobs, fresh destinations, and reads shared between
ranks (``read="once"``)."""
