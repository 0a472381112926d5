"""Everything that knows torch, and nothing that knows a dataset."""
