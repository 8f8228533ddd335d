"""Quartermaster: GraphQL API for a B2B back office."""
