"""The two-tower LoRA-BERT recommender."""
