"""The select stage: read instruction data, score every row, keep k rows (Ray Data)."""
