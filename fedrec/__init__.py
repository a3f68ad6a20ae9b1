"""fedrec: federated, privacy-preserving recommendation with LoRA-BERT, Flower and Opacus."""

__version__ = "0.1.0"
