"""Small self-supervised trainers that use LDReg on real bundled data."""
