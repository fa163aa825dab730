"""PAPER §8's ablation as configurations of the one pipeline (`rows`) and its report (`report`)."""
