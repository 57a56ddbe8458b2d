"""Offline KBVQ-MoE quantizer: calibration, IDRE, VQ, BCOS, checkpoint writing."""
