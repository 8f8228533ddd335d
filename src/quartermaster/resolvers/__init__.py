"""Thin root fields per domain; ``api.py`` merges them into the Query/Mutation roots."""
