"""fedrec's Flower ClientApp."""
