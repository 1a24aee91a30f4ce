"""The frozen quantized base (NF4, FP4, int8): tensor subclasses and their custom ops."""
