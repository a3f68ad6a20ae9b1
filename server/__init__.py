"""fedrec's Flower ServerApp and strategies."""
