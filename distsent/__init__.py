"""distsent: fine-tune BERT-style encoders for sentiment and emotion, from one CPU to many GPUs."""

__version__ = "0.1.0"
